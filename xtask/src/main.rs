//! `cargo xtask setup | test | demo | bench`: prerequisites, the test suite,
//! the demo environment and the benchmarks. Every command that needs the
//! prerequisites installs what is missing first (vagrant/provision.sh).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod demo;
mod env;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites (apt packages, nightly rust-src, bpf-linker 0.10).
    Setup,
    /// Format check, clippy -D warnings, unit tests and the privileged end-to-end tests.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Start a local HTTP server, the agent and a tagged curl loop; print what was recorded.
    Demo,
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
    run(&mut c)
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
