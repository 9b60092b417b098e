//! `cargo xtask setup | test | demo | bench | fuzz | deny`: prerequisites, the
//! test suite, the demo environment, the benchmarks, the fuzz targets and the
//! dependency policy. Every command that needs the prerequisites installs what
//! is missing first (vagrant/provision.sh).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod deny;
mod env;
mod fuzz;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites (apt packages, nightly rust-src, bpf-linker 0.10,
    /// cargo-fuzz, cargo-deny).
    Setup,
    /// Format check, the dependency policy (cargo-deny), clippy -D warnings,
    /// unit tests, the privileged end-to-end tests, and (without a filter) a
    /// short run of every fuzz target.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Start a local HTTP server, the agent and a tagged curl loop; print what was recorded.
    Demo,
    /// Benchmarks (figures in BENCHMARKS.md).
    Bench {
        #[arg(value_parser = ["redirect", "audit", "policy", "http", "postgres", "ssh"])]
        which: String,
        /// Short connections (HTTP: requests) per side.
        #[arg(long, default_value_t = 5000)]
        conns: usize,
        /// Bulk transfer per side, MiB.
        #[arg(long, default_value_t = 1024)]
        mib: usize,
        /// Events per recorder run (audit).
        #[arg(long, default_value_t = 2_000_000)]
        events: u64,
        /// postgres: only the pgbench table (skip the connect and SELECT 1
        /// latencies).
        #[arg(long)]
        pgbench_only: bool,
    },
    /// Fuzz a parser (cargo-fuzz on nightly; installed when missing). New
    /// inputs are added to fuzz/corpus/NAME; a crash fails, naming its input.
    Fuzz {
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(fuzz::NAMES))]
        name: String,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Minimise fuzz/corpus/NAME in place (cargo fuzz cmin) instead of fuzzing.
        #[arg(long)]
        cmin: bool,
        /// Add new inputs to fuzz/target/smoke-corpus/NAME, not the committed corpus
        /// (what `cargo xtask test` does).
        #[arg(long, conflicts_with = "cmin")]
        scratch: bool,
    },
    /// The dependency policy of deny.toml: `cargo deny check licenses bans
    /// sources` (cargo-deny installed when missing).
    Deny,
    /// The benchmark client (run by `bench`, tagged and untagged).
    #[command(hide = true)]
    BenchClient {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    match dispatch(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Test { filter } => test(filter),
        Cmd::Demo => demo::run(),
        Cmd::Bench {
            which,
            conns,
            mib,
            events,
            pgbench_only,
        } => match which.as_str() {
            "redirect" => bench::redirect(conns, mib),
            "audit" => bench::audit(conns, events),
            "http" => bench::http(conns),
            "postgres" => bench::postgres(conns, pgbench_only),
            "ssh" => bench::ssh(conns),
            "policy" => {
                setup()?;
                run(cargo().args(["bench", "-p", "loopgate", "--bench", "policy"]))
            }
            other => anyhow::bail!("unknown benchmark {other}"),
        },
        Cmd::Fuzz {
            name, cmin: true, ..
        } => fuzz::cmin(&name),
        Cmd::Fuzz {
            name,
            secs,
            scratch,
            ..
        } => {
            let corpus = match scratch {
                true => fuzz::Corpus::Scratch,
                false => fuzz::Corpus::Committed,
            };
            fuzz::fuzz(&name, secs, corpus)
        }
        Cmd::Deny => deny::check(),
        Cmd::BenchClient { args } => bench::client(&args),
    }
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn setup() -> Result<()> {
    run(Command::new("bash").arg(workspace().join("vagrant/provision.sh")))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace());
    c
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

pub fn build_debug() -> Result<PathBuf> {
    run(cargo().args(["build", "-p", "loopgate"]))?;
    Ok(workspace().join("target/debug/loopgate"))
}

fn test(filter: Option<String>) -> Result<()> {
    setup()?;
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc_geteuid() } != 0 {
        bail!("the end-to-end tests attach eBPF programs and create cgroups: run `cargo xtask test` as root");
    }
    run(cargo().args(["fmt", "--all", "--check"]))?;
    deny::check()?;
    // The kernel crate is checked for its own target: on the host, feature
    // unification would give it aya's std.
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "loopgate-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("rustup")
        .current_dir(workspace().join("agent-ebpf"))
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER"))?;
    let bin = build_debug()?;
    env::clean_leftovers();
    let fuzz_smoke = filter.is_none();
    let mut c = cargo();
    c.args([
        "test",
        "--workspace",
        "--exclude",
        "loopgate-ebpf",
        "--no-fail-fast",
    ])
    .env("LOOPGATE_BIN", &bin)
    .stdin(Stdio::null());
    // The end-to-end tests mostly wait on processes and sockets.
    c.args(["--", "--test-threads", "4"]);
    if let Some(f) = filter {
        c.arg(f);
    }
    run(&mut c)?;
    if fuzz_smoke {
        // The committed corpus is replayed, then new inputs are tried.
        fuzz::fuzz("all", fuzz::SMOKE_SECS, fuzz::Corpus::Scratch)?;
    }
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
