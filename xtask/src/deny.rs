//! `cargo xtask deny`: the dependency policy of `deny.toml` (licenses, bans,
//! sources) with cargo-deny, on the main workspace (`fuzz/` is its own).
//! `cargo xtask test` runs it after the format check.
//!
//! The advisories check is not run: it is the only one that fetches a
//! database. These three need no network once the crates are downloaded
//! (cargo-deny runs `cargo fetch` first, a no-op when they are).

use anyhow::{bail, Context as _, Result};

use crate::{cargo, run};

/// cargo-deny version; installed when missing (as vagrant/provision.sh does).
const CARGO_DENY: &str = "0.20.2";

/// The checks run: what `deny.toml` configures.
const CHECKS: &[&str] = &["licenses", "bans", "sources"];

pub fn check() -> Result<()> {
    ensure_cargo_deny()?;
    let mut c = cargo();
    // --locked: the check judges the committed Cargo.lock, never a new one.
    // The inclusion graphs (which of our crates pulls a crate in) would print
    // a tree for every duplicate-version warning; the rerun below shows them.
    c.args(["deny", "--locked", "check", "--hide-inclusion-graph"])
        .args(CHECKS);
    eprintln!("+ {c:?}");
    let st = c.status().with_context(|| format!("running {c:?}"))?;
    if !st.success() {
        bail!(
            "the dependency policy in deny.toml refused a crate ({st}): the errors above \
             name it and the rule (a license not in [licenses] allow, a banned crate, or a \
             source other than crates.io). `cargo deny check {}` shows which of our crates \
             pulls it in. Replace the dependency, or change deny.toml in a commit that \
             says why.",
            CHECKS.join(" ")
        );
    }
    Ok(())
}

fn ensure_cargo_deny() -> Result<()> {
    let version = cargo()
        .args(["deny", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if version.trim() == format!("cargo-deny {CARGO_DENY}") {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deny {CARGO_DENY} (2-3 minutes)");
    run(cargo()
        .args(["install", "--locked"])
        .arg(format!("cargo-deny@{CARGO_DENY}")))
}
