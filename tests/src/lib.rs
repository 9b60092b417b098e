//! Harness for loopgate's end-to-end tests: real agent processes with real eBPF
//! programs attached to real cgroups, real servers on loopback aliases
//! (127.10.0.0/16), and real clients (curl, /usr/bin/python3) run as tagged
//! loops through `loopgate exec`.
//!
//! Every test agent gets its own cgroup root (`lgt-<name>`), pin directory,
//! proxy port, admin socket and state directory, so tests run in parallel. The
//! [`Agent`] guard stops the agent and detaches everything on drop; `cargo xtask
//! test` also removes leftovers of an interrupted run first.
//!
//! Tests `panic!` with context rather than returning errors (backtraces).
//!
//! | module | what it holds |
//! |---|---|
//! | [`agent`] | [`Agent`] (start, CLI, sessions, approvals, tagged loops), [`AgentSpec`] (the config it writes), [`Loop`], cgroups |
//! | [`servers`] | one module each: [`EchoServer`], [`HttpServer`]/[`RawHttpServer`], [`PgServer`], [`SshServer`], [`ClickHouse`] |
//! | [`idp`] | [`Idp`]: the JWT/JWKS test issuer |
//! | [`curl`] | [`curl()`] and [`Agent::curl`]: the one curl runner |
//! | [`util`] | output text, file modes, dev-cache tools |

pub mod agent;
pub mod curl;
pub mod idp;
pub mod servers;
pub mod util;

pub use agent::{
    agent_files_contain,
    cgroup::{cgroup2_mount, find_cgroup2_mount, remove_cgroup_tree, NamedCgroup},
    loopgate_bin,
    loops::Loop,
    require_root,
    spec::{free_privileged_port, AgentSpec},
    Agent,
};
pub use curl::curl;
pub use idp::{Idp, ISSUER};
pub use serde_json::Value;
pub use servers::{
    clickhouse::{chdb_python, sql_blocks, ClickHouse},
    echo::{direct_roundtrip, EchoServer},
    free_port,
    http::{gzip, webhook_receiver, zlib, HttpServer, RawHttpServer},
    postgres::PgServer,
    ssh::{SshServer, SSH_USER},
};
pub use util::{loops_python, playwright_core, set_mode, stderr, stdout};
