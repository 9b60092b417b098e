//! `cargo xtask fuzz NAME [--secs N]`: the fuzz targets of `fuzz/` (cargo-fuzz,
//! nightly, AddressSanitizer and debug assertions). The drivers and their
//! properties are in `agent/src/fuzzing.rs`.
//!
//! A run reads `fuzz/corpus/NAME` and adds what it finds there (minimise
//! with `--cmin` before committing); the CI smoke in `cargo xtask test`
//! adds to a scratch corpus under `fuzz/target` instead. A crash, timeout
//! or out-of-memory input fails the command, naming the artifact.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{run, workspace};

/// `all`, then the targets (= the `[[bin]]`s of fuzz/Cargo.toml).
pub const NAMES: &[&str] = &[
    "all",
    "pg_startup",
    "http_path",
    "policy",
    "config",
    "dns_query",
    "pg_sql",
    "pg_messages",
];
const TARGETS: &[&str] = NAMES.split_at(1).1;

/// Seconds per target in `cargo xtask test`.
pub const SMOKE_SECS: u64 = 20;

/// cargo-fuzz release line; installed when missing (as vagrant/provision.sh does).
const CARGO_FUZZ: &str = "0.13";

/// Per-input limits: a parser that takes longer or grows past this is a finding.
const LIBFUZZER_FLAGS: &[&str] = &["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"];

/// Where new inputs go.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Corpus {
    /// `fuzz/corpus/NAME`, to be minimised and committed.
    Committed,
    /// `fuzz/target/smoke-corpus/NAME`; the committed corpus is only read.
    Scratch,
}

/// What libFuzzer said at the end of a run.
#[derive(Default)]
struct Stats {
    /// The last status line (`#N ... cov: C ft: F corp: ...`).
    last: Option<String>,
    executed: Option<String>,
    per_sec: Option<String>,
    new_units: Option<String>,
    artifact: Option<String>,
}

fn fuzz_dir() -> PathBuf {
    workspace().join("fuzz")
}

fn names(name: &str) -> Result<Vec<&'static str>> {
    if name == "all" {
        return Ok(TARGETS.to_vec());
    }
    match TARGETS.iter().find(|t| **t == name) {
        Some(t) => Ok(vec![*t]),
        None => bail!("no fuzz target {name} (one of all, {})", TARGETS.join(", ")),
    }
}

/// `cargo xtask fuzz NAME --secs N`: each named target for `secs` seconds.
pub fn fuzz(name: &str, secs: u64, corpus: Corpus) -> Result<()> {
    let names = names(name)?;
    ensure_cargo_fuzz()?;
    let mut summary = Vec::new();
    for t in names {
        let stats = run_target(t, secs, corpus)?;
        summary.push((t, stats));
    }
    eprintln!("\nfuzz summary ({secs} s per target):");
    for (t, s) in &summary {
        eprintln!(
            "  {t:<11} executions {:>10}  ({}/s, {} new units)  {}",
            s.executed.as_deref().unwrap_or("?"),
            s.per_sec.as_deref().unwrap_or("?"),
            s.new_units.as_deref().unwrap_or("?"),
            s.last.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// `cargo xtask fuzz NAME --cmin`: minimise the committed corpus in place.
/// The hand-made inputs (`seed-*`, from fuzz/seeds.py) and the reproducers
/// of fixed findings (`regress-*`) are kept under their names.
pub fn cmin(name: &str) -> Result<()> {
    let names = names(name)?;
    ensure_cargo_fuzz()?;
    for t in names {
        let dir = fuzz_dir().join("corpus").join(t);
        let mut kept = Vec::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let path = e?.path();
            let named = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-") || n.starts_with("regress-"));
            if named {
                let data = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
                kept.push((path, data));
            }
        }
        run(fuzz_cmd()
            .args(["cmin", "--debug-assertions", t])
            .arg(Path::new("corpus").join(t))
            .args(["--", "-rss_limit_mb=2048", "-timeout=10"]))?;
        for (path, data) in kept {
            std::fs::write(&path, data).with_context(|| format!("{}", path.display()))?;
        }
    }
    Ok(())
}

fn fuzz_cmd() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(fuzz_dir())
        .args(["+nightly", "fuzz"])
        // Set by an outer `cargo xtask`: they would pick the stable tools.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO")
        .stdin(Stdio::null());
    c
}

fn ensure_cargo_fuzz() -> Result<()> {
    let version = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .env_remove("RUSTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if version.contains(&format!(" {CARGO_FUZZ}.")) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ} (a few minutes)");
    run(Command::new("cargo")
        .args(["+nightly", "install", "--locked"])
        .arg(format!("cargo-fuzz@~{CARGO_FUZZ}"))
        .env_remove("RUSTC"))
}

fn run_target(t: &str, secs: u64, corpus: Corpus) -> Result<Stats> {
    let committed = Path::new("corpus").join(t);
    let mut c = fuzz_cmd();
    c.args(["run", "--debug-assertions", t]);
    if corpus == Corpus::Scratch {
        let scratch = Path::new("target/smoke-corpus").join(t);
        std::fs::create_dir_all(fuzz_dir().join(&scratch))
            .with_context(|| format!("creating fuzz/{}", scratch.display()))?;
        // libFuzzer adds new inputs to the first directory only.
        c.arg(scratch);
    }
    c.arg(&committed)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .args(LIBFUZZER_FLAGS)
        .stderr(Stdio::piped());
    eprintln!("+ {c:?}");
    let mut child = c.spawn().with_context(|| format!("running {c:?}"))?;
    let mut stats = Stats::default();
    let stderr = child.stderr.take().context("fuzzer stderr")?;
    let mut rd = BufReader::new(stderr);
    let mut line = Vec::new();
    while rd
        .read_until(b'\n', &mut line)
        .context("reading fuzzer output")?
        > 0
    {
        let l = String::from_utf8_lossy(&line);
        eprint!("{l}");
        let l = l.trim_end();
        let value = |key: &str| l.strip_prefix(key).map(|v| v.trim().to_owned());
        if l.starts_with('#') && l.contains(" cov: ") {
            stats.last = Some(l.to_owned());
        } else if let Some(v) = value("stat::number_of_executed_units:") {
            stats.executed = Some(v);
        } else if let Some(v) = value("stat::average_exec_per_sec:") {
            stats.per_sec = Some(v);
        } else if let Some(v) = value("stat::new_units_added:") {
            stats.new_units = Some(v);
        } else if let Some((_, path)) = l.split_once("Test unit written to ") {
            stats.artifact = Some(path.trim().to_owned());
        }
        line.clear();
    }
    let st = child.wait().context("waiting for the fuzzer")?;
    if !st.success() {
        match &stats.artifact {
            Some(a) => bail!(
                "fuzz target {t} failed ({st}); the input is {}\n  reproduce: cd fuzz && cargo +nightly fuzz run --debug-assertions {t} {a}",
                fuzz_dir().join(a).display()
            ),
            None => bail!("fuzz target {t} failed ({st}) without an artifact (build error?)"),
        }
    }
    Ok(stats)
}
