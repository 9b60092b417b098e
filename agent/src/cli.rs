//! Command line: `loopgate agent | exec | status | sessions`.

use std::{io::Write, path::PathBuf, process::ExitCode, time::SystemTime};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

use crate::{admin, audit, config, daemon, exec, telemetry};

#[derive(Parser)]
#[command(
    name = "loopgate",
    version,
    about = "Policy enforcement for agent loops"
)]
pub struct Cli {
    /// Agent configuration file.
    #[arg(long, global = true, default_value = config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the node agent (needs root).
    Agent {
        /// Log format.
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        log_format: String,
    },
    /// Run a command as a tagged loop of WORKLOAD.
    Exec {
        #[arg(long)]
        workload: String,
        /// Unprivileged user to run as (default: $SUDO_USER, else nobody).
        #[arg(long)]
        user: Option<String>,
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Attached programs, targets, egress mode and active sessions.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Recorded sessions (and denied connects) from the audit store.
    Sessions {
        #[arg(long)]
        workload: Option<String>,
        #[arg(long)]
        target: Option<String>,
        /// RFC 3339 time (2026-11-24T10:00:00Z) or a duration ago (15m, 2h, 1day).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loopgate: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Agent { log_format } => {
            telemetry::init(log_format == "json");
            let cfg = config::Config::load(&cli.config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("loopgate")
                .build()
                .context("starting the async runtime")?;
            rt.block_on(daemon::run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Exec {
            workload,
            user,
            command,
        } => {
            telemetry::init(false);
            let cfg = config::Config::load(&cli.config)?;
            let code = exec::run(
                &cfg,
                exec::ExecArgs {
                    workload,
                    user,
                    command,
                },
            )?;
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        Cmd::Status { json } => {
            let cfg = config::Config::load(&cli.config)?;
            let v = admin::call(&cfg.agent.admin_socket, &admin::Request::Status)?;
            if json {
                println!("{v}");
            } else {
                print_status(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sessions {
            workload,
            target,
            since,
            json,
        } => {
            let cfg = config::Config::load(&cli.config)?;
            let since = since.as_deref().map(parse_since).transpose()?;
            let rows = audit::read_sessions(&cfg.agent.state_dir)?;
            let out = std::io::stdout();
            let mut out = out.lock();
            if !json {
                writeln!(
                    out,
                    "{:<36}  {:<12} {:<12} {:<8} {:>7} {:>6} {:<27} {:>10} {:>10}  OUTCOME",
                    "SESSION", "WORKLOAD", "TARGET", "PROTO", "PID", "UID", "STARTED", "UP", "DOWN"
                )?;
            }
            for r in rows.iter().filter(|r| {
                workload.as_ref().is_none_or(|w| &r.workload == w)
                    && target.as_ref().is_none_or(|t| &r.target == t)
                    && since
                        .as_ref()
                        .is_none_or(|s| r.started_at.as_str() >= s.as_str())
            }) {
                if json {
                    writeln!(out, "{}", serde_json::to_string(r)?)?;
                } else {
                    writeln!(
                        out,
                        "{:<36}  {:<12} {:<12} {:<8} {:>7} {:>6} {:<27} {:>10} {:>10}  {}",
                        r.session_id,
                        r.workload,
                        r.target,
                        r.protocol,
                        r.pid,
                        r.uid,
                        r.started_at,
                        r.bytes_up,
                        r.bytes_down,
                        r.outcome
                    )?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--since`: an RFC 3339 time or a duration ago, as the timestamp string the
/// store holds (RFC 3339 UTC, microseconds; these compare as text).
fn parse_since(s: &str) -> anyhow::Result<String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(audit::timestamp(SystemTime::now() - d));
    }
    match humantime::parse_rfc3339_weak(s) {
        Ok(t) => Ok(audit::timestamp(t)),
        Err(_) => bail!("--since `{s}`: expected an RFC 3339 time (2026-11-24T10:00:00Z) or a duration (15m, 2h)"),
    }
}

fn print_status(v: &serde_json::Value) {
    let s = |k: &str| {
        v.get(k)
            .map(|x| x.to_string().trim_matches('"').to_owned())
            .unwrap_or_default()
    };
    println!(
        "loopgate agent {} (pid {}, up {}s)",
        s("version"),
        s("pid"),
        s("uptime_secs")
    );
    println!("cgroup root:     {}", s("cgroup_root"));
    println!("proxy listeners: {}", s("proxy_listeners"));
    println!("egress mode:     {}", s("egress"));
    println!("active sessions: {}", s("active_sessions"));
    println!("spool depth:     {}", s("spool_depth"));
    println!("programs:");
    for p in v
        .get("programs")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        println!(
            "  {:<16} {:<20} link {:<6} prog {:<6} {}",
            p["program"].as_str().unwrap_or(""),
            p["attach_type"].as_str().unwrap_or(""),
            p["link_id"],
            p["program_id"],
            p["cgroup"].as_str().unwrap_or("")
        );
    }
    println!("targets:");
    for t in v
        .get("targets")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        println!(
            "  {:<16} {:<24} {:<10} -> {}{}",
            t["name"].as_str().unwrap_or(""),
            t["address"].as_str().unwrap_or(""),
            t["protocol"].as_str().unwrap_or(""),
            t["resolved"],
            t.get("resolve_error")
                .map(|e| format!("  (resolve error: {e})"))
                .unwrap_or_default()
        );
    }
    println!("kernel counters: {}", s("kernel_counters"));
    println!("audit:           {}", s("audit"));
}
