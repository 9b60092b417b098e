//! Command line: `loopgate agent | exec | status | sessions | replay | approvals | trust | policy | audit-schema`.

use std::{io::Write, path::PathBuf, process::ExitCode, time::SystemTime};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

use crate::{
    admin,
    audit::{
        self,
        clickhouse::{full_ddl, Ch, Dialect},
        query::{self, Filter},
        rows::DIRECTION_UP,
        spool_dir,
    },
    config, daemon, exec, telemetry,
};

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
        /// Pass this variable of the caller's environment to the loop
        /// (repeatable). Otherwise the loop gets only PATH, LANG, TERM, its
        /// user's HOME, USER, LOGNAME, SHELL, and LOOPGATE_WORKLOAD/INSTANCE.
        #[arg(long = "env", value_name = "NAME")]
        env: Vec<String>,
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Attached programs, targets, egress mode and active sessions.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Everything recorded about one session: metadata, events, payload.
    Replay {
        session_id: uuid::Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Requests held for approval.
    Approvals {
        #[command(subcommand)]
        cmd: ApprovalsCmd,
    },
    /// The agent's CA in this host's trust store: the one-time host step
    /// for loops that verify the certificates the agent answers with.
    Trust {
        #[command(subcommand)]
        cmd: TrustCmd,
    },
    /// Policies.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Print the ClickHouse DDL the agent applies (for analysts and reviews).
    AuditSchema {
        #[arg(long, value_parser = ["modern", "legacy"], default_value = "modern")]
        dialect: String,
        /// Database name (default: audit.database from the config, else loopgate).
        #[arg(long)]
        database: Option<String>,
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

#[derive(Subcommand)]
pub enum ApprovalsCmd {
    /// Pending requests.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Let a held request through (you must be a configured approver).
    Approve {
        id: uuid::Uuid,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Refuse a held request.
    Deny {
        id: uuid::Uuid,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
pub enum TrustCmd {
    /// Add the agent's CA (state_dir/ca/ca.pem) to the system trust store
    /// (Debian: /usr/local/share/ca-certificates, update-ca-certificates),
    /// and, with SSH targets, its SSH host CA as an `@cert-authority` line
    /// for their host patterns in /etc/ssh/ssh_known_hosts.
    Install,
    /// Remove them again.
    Uninstall,
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Validate a policy directory (default: agent.policies of the config).
    /// Exit 0 when valid; otherwise every error as file:line:column: reason.
    Check { dir: Option<PathBuf> },
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
            env,
            command,
        } => {
            telemetry::init(false);
            let cfg = config::Config::load(&cli.config)?;
            let code = exec::run(
                &cfg,
                exec::ExecArgs {
                    workload,
                    user,
                    env,
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
            let filter = Filter {
                workload,
                target,
                since: since.as_deref().map(parse_since).transpose()?,
            };
            let rows = match Ch::from_config(&cfg)? {
                Some(ch) => block_on(ch.sessions(&filter))??,
                None => {
                    let mut rows = query::local_sessions(&spool_dir(&cfg.agent.state_dir))?;
                    rows.retain(|r| filter.matches(r));
                    rows
                }
            };
            let out = std::io::stdout();
            let mut out = out.lock();
            if !json {
                writeln!(
                    out,
                    "{:<36}  {:<12} {:<12} {:<8} {:>7} {:>6} {:<27} {:>10} {:>10}  OUTCOME",
                    "SESSION", "WORKLOAD", "TARGET", "PROTO", "PID", "UID", "STARTED", "UP", "DOWN"
                )?;
            }
            for r in &rows {
                if json {
                    writeln!(out, "{}", query::session_json(r))?;
                } else {
                    writeln!(
                        out,
                        "{:<36}  {:<12} {:<12} {:<8} {:>7} {:>6} {:<27} {:>10} {:>10}  {}",
                        r.session_id,
                        r.workload,
                        r.target,
                        r.protocol,
                        r.tgid,
                        r.uid,
                        audit::timestamp(r.started_at),
                        r.bytes_up,
                        r.bytes_down,
                        r.outcome
                    )?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Replay { session_id, json } => {
            let cfg = config::Config::load(&cli.config)?;
            let replay = match Ch::from_config(&cfg)? {
                Some(ch) => block_on(ch.replay(session_id))??,
                None => query::local_replay(&spool_dir(&cfg.agent.state_dir), session_id)?,
            };
            let Some(r) = replay else {
                bail!("no session {session_id} in the audit store");
            };
            print_replay(&r, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Trust { cmd } => {
            let cfg = config::Config::load(&cli.config)?;
            match cmd {
                TrustCmd::Install => {
                    let path = crate::ca::trust::install(&cfg.agent.state_dir)?;
                    println!("trusted: {} (the agent's CA)", path.display());
                    let patterns = crate::ssh_ca::host_patterns(&cfg);
                    let file = std::path::Path::new(crate::ssh_ca::known_hosts::SYSTEM);
                    if patterns.is_empty() {
                        // No SSH targets (any more): no line of this agent's.
                        if crate::ssh_ca::ca_pub_path(&cfg.agent.state_dir).exists() {
                            let ca =
                                crate::ssh_ca::SshHostCa::load_or_create(&cfg.agent.state_dir)?;
                            crate::ssh_ca::known_hosts::uninstall(file, &ca.fingerprint())?;
                        }
                    } else {
                        let ca = crate::ssh_ca::SshHostCa::load_or_create(&cfg.agent.state_dir)?;
                        crate::ssh_ca::known_hosts::install(
                            file,
                            &patterns,
                            &ca.public_line(),
                            &ca.fingerprint(),
                        )?;
                        println!(
                            "trusted: {} (the agent's SSH host CA for {})",
                            file.display(),
                            patterns.join(",")
                        );
                    }
                }
                TrustCmd::Uninstall => {
                    match crate::ca::trust::uninstall(&cfg.agent.state_dir)? {
                        Some(path) => println!("removed: {}", path.display()),
                        None => println!("the agent's CA was not in the trust store"),
                    }
                    if crate::ssh_ca::ca_pub_path(&cfg.agent.state_dir).exists() {
                        let ca = crate::ssh_ca::SshHostCa::load_or_create(&cfg.agent.state_dir)?;
                        let file = std::path::Path::new(crate::ssh_ca::known_hosts::SYSTEM);
                        if crate::ssh_ca::known_hosts::uninstall(file, &ca.fingerprint())? {
                            println!("removed: the agent's SSH host CA from {}", file.display());
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Approvals { cmd } => {
            let cfg = config::Config::load(&cli.config)?;
            let sock = &cfg.agent.admin_socket;
            match cmd {
                ApprovalsCmd::List { json } => {
                    let v = admin::call(sock, &admin::Request::ApprovalsList)?;
                    let pending = v["pending"].as_array().cloned().unwrap_or_default();
                    if json {
                        for p in &pending {
                            println!("{p}");
                        }
                    } else {
                        println!(
                            "{:<36}  {:<12} {:<12} {:<20} {:<27} REQUEST",
                            "APPROVAL", "WORKLOAD", "TARGET", "RULE", "EXPIRES"
                        );
                        for p in &pending {
                            let f = |k: &str| p[k].as_str().unwrap_or("").to_owned();
                            println!(
                                "{:<36}  {:<12} {:<12} {:<20} {:<27} {}",
                                f("approval_id"),
                                f("workload"),
                                f("target"),
                                f("rule_id"),
                                f("expires_at"),
                                f("request")
                            );
                        }
                    }
                }
                ApprovalsCmd::Approve { id, reason } => {
                    admin::call(
                        sock,
                        &admin::Request::ApprovalsDecide {
                            id,
                            approve: true,
                            reason,
                        },
                    )?;
                    println!("approved {id}");
                }
                ApprovalsCmd::Deny { id, reason } => {
                    admin::call(
                        sock,
                        &admin::Request::ApprovalsDecide {
                            id,
                            approve: false,
                            reason,
                        },
                    )?;
                    println!("denied {id}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Policy {
            cmd: PolicyCmd::Check { dir },
        } => {
            let cfg = config::Config::load(&cli.config);
            let dir = match (&dir, &cfg) {
                (Some(d), _) => d.clone(),
                (None, Ok(c)) => c.agent.policies.clone(),
                (None, Err(e)) => bail!("{e} (pass the policy directory explicitly)"),
            };
            let targets: Option<std::collections::HashSet<String>> = match &cfg {
                Ok(c) => Some(c.targets.iter().map(|t| t.name.clone()).collect()),
                Err(_) => {
                    eprintln!(
                        "note: {} not readable; target names are not checked",
                        cli.config.display()
                    );
                    None
                }
            };
            match crate::policy::load_dir(&dir, targets.as_ref()) {
                Ok(p) => {
                    println!(
                        "{}: ok ({} files, {} rules)",
                        dir.display(),
                        p.files,
                        p.rule_count()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    for e in &errors.0 {
                        eprintln!("{e}");
                    }
                    eprintln!("{} error(s)", errors.0.len());
                    Ok(ExitCode::from(1))
                }
            }
        }
        Cmd::AuditSchema { dialect, database } => {
            let db = match database {
                Some(d) => d,
                None => config::Config::load(&cli.config)
                    .map(|c| c.audit.database)
                    .unwrap_or_else(|_| "loopgate".into()),
            };
            let d = Dialect::parse(&dialect).context("dialect")?;
            for stmt in full_ddl(d, &db, 90) {
                println!("{stmt};\n");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(f))
}

fn print_replay(r: &query::Replay, json: bool) -> anyhow::Result<()> {
    let out = std::io::stdout();
    let mut out = out.lock();
    let s = &r.session;
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"kind": "session", "session": query::session_json(s)})
        )?;
        for e in &r.events {
            writeln!(
                out,
                "{}",
                serde_json::json!({"kind": "event", "ts": audit::timestamp(e.ts), "event_kind": e.kind, "request": e.request, "verdict": e.verdict, "rule_id": e.rule_id, "reason": e.reason, "attrs": e.attr_keys.iter().zip(&e.attr_values).collect::<std::collections::BTreeMap<_, _>>()})
            )?;
        }
        for c in &r.chunks {
            writeln!(
                out,
                "{}",
                serde_json::json!({"kind": "chunk", "ts": audit::timestamp(c.ts), "direction": if c.direction == DIRECTION_UP { "up" } else { "down" }, "seq": c.seq, "offset": c.offset, "masked": c.masked != 0, "data": String::from_utf8_lossy(&c.data)})
            )?;
        }
        return Ok(());
    }
    let rel = |t: i64| format!("+{:.3} ms", (t - s.started_at) as f64 / 1000.0);
    writeln!(
        out,
        "session {}  outcome {}{}",
        s.session_id,
        s.outcome,
        if s.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.detail)
        }
    )?;
    writeln!(
        out,
        "  workload {}  cgroup {}  pid {}  uid {}  gid {}  comm {}  host {}",
        s.workload, s.cgroup, s.tgid, s.uid, s.gid, s.comm, s.host
    )?;
    writeln!(
        out,
        "  target {} ({}) -> {}",
        s.target, s.protocol, s.destination
    )?;
    writeln!(
        out,
        "  started {}  ended {}  bytes up {} down {}",
        audit::timestamp(s.started_at),
        if s.ended_at == 0 {
            "-".to_owned()
        } else {
            audit::timestamp(s.ended_at)
        },
        s.bytes_up,
        s.bytes_down
    )?;
    for e in &r.events {
        writeln!(
            out,
            "{}  event {} {}: {}  [rule {}] {}",
            rel(e.ts),
            e.verdict,
            e.kind,
            e.request,
            e.rule_id,
            e.reason
        )?;
    }
    // Consecutive chunks of one direction are shown as one block of text.
    let mut i = 0;
    while i < r.chunks.len() {
        let first = &r.chunks[i];
        let mut j = i;
        let mut data = Vec::new();
        let mut masked = false;
        while j < r.chunks.len() && r.chunks[j].direction == first.direction {
            data.extend_from_slice(&r.chunks[j].data);
            masked |= r.chunks[j].masked != 0;
            j += 1;
        }
        let (arrow, dir) = if first.direction == DIRECTION_UP {
            (">", "up")
        } else {
            ("<", "down")
        };
        let seqs = if j - i > 1 {
            format!("#{}-{}", first.seq, r.chunks[j - 1].seq)
        } else {
            format!("#{}", first.seq)
        };
        writeln!(
            out,
            "{}  {arrow} {dir} {seqs} @{} {} bytes{}",
            rel(first.ts),
            first.offset,
            data.len(),
            if masked { " (masked)" } else { "" }
        )?;
        for line in data.split_inclusive(|&b| b == b'\n') {
            writeln!(out, "    {}", line.escape_ascii())?;
        }
        i = j;
    }
    let captured: usize = r.chunks.iter().map(|c| c.data.len()).sum();
    let total = s.bytes_up + s.bytes_down;
    if (captured as u64) < total {
        writeln!(out, "(captured {captured} of {total} bytes; audit.capture_bytes limits capture per direction)")?;
    }
    Ok(())
}

/// `--since`: an RFC 3339 time or a duration ago, in microseconds since the epoch.
fn parse_since(s: &str) -> anyhow::Result<i64> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(audit::micros(SystemTime::now() - d));
    }
    match humantime::parse_rfc3339_weak(s) {
        Ok(t) => Ok(audit::micros(t)),
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
