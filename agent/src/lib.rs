//! loopgate: a per-host node agent that puts a policy enforcement point in the
//! data path of agent loops, without reconfiguring their clients.
//!
//! Module map (see ARCHITECTURE.md for the data path):
//!
//! - [`kinds`]: the typed vocabulary (protocols, operation and event kinds,
//!   refusals, outcomes); a leaf.
//! - [`config`]: `agent.toml`, strict parsing with file/key/line errors.
//! - [`cgroup`]: the cgroup2 mount, the agent's subtree, cgroup id → workload.
//! - [`ebpf`]: loading, pinning and attaching the kernel programs; the only
//!   writer to their maps; the denial ring buffer and aya-log pump.
//! - [`targets`]: registered targets, host name resolution, the target map.
//! - [`policy`]: policy files, compilation, CEL conditions, pure evaluation,
//!   hot reload.
//! - [`proxy`]: listeners, accept, identity (kernel record + peer check),
//!   the refusals before any protocol, the session table, the closing row.
//! - [`session`]: the seam every protocol handler gets (who, second factor,
//!   decisions, events, credential, upstream, capture).
//! - [`protocol`]: the `ProtocolHandler` trait, its registry, and one folder
//!   per protocol (`http`, `postgres`, `dns`, `tcp`).
//! - [`sockdiag`]: kernel socket lookups by 4-tuple (peer cookie check, the
//!   cgroup of a local listener).
//! - [`audit`]: the audit sink (queue → durable spool → ClickHouse), payload
//!   capture, schema, migrations, and the queries behind `sessions` and
//!   `replay`.
//! - [`secrets`]: stored credentials, never printed, and the masker that keeps
//!   them out of audit records.
//! - [`admin`]: the admin unix socket (server and client).
//! - [`admin_http`]: the loopback admin HTTP port: `/metrics`, the approval page.
//! - [`metrics`]: Prometheus metrics.
//! - [`approval`]: held requests, approvers, grants, timeouts.
//! - [`notify`]: approval webhooks (Slack-compatible JSON, retried).
//! - [`limits`]: session caps (per workload, in all, by open files) and the
//!   per-workload capture budget.
//! - [`identity`]: the optional second factor: JWT verification against a JWKS.
//! - [`http_client`]: the agent's own outbound HTTP(S) client.
//! - [`dns`]: the resolver that answers tagged loops' DNS queries (judged by
//!   name, recorded).
//! - [`exec`]: `loopgate exec`, running a command as a tagged loop.
//! - [`daemon`]: `loopgate agent`, wiring it all together.
//! - [`cli`], [`telemetry`]: the command line and logging.
//! - `fuzzing` (hidden): the drivers of the fuzz targets in `fuzz/`.

pub mod admin;
pub mod admin_http;
pub mod approval;
pub mod audit;
pub mod ca;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod ebpf;
pub mod exec;
#[doc(hidden)]
pub mod fuzzing;
pub mod http_client;
pub mod identity;
pub mod kinds;
pub mod limits;
pub mod masking;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod secrets;
pub mod session;
pub mod sockdiag;
pub mod ssh_ca;
pub mod targets;
pub mod telemetry;
