//! Logging: `tracing` with an `EnvFilter` (`LOOPGATE_LOG`, then `RUST_LOG`,
//! default `info`), text or JSON. The kernel programs' aya-log records arrive
//! through the `log` bridge as events of target `loopgate_ebpf`.
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

pub fn init(json: bool) {
    let filter = std::env::var("LOOPGATE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .map(EnvFilter::new)
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let registry = tracing_subscriber::registry().with(filter);
    let r = if json {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init()
    } else {
        registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    // try_init also installs the `log` → `tracing` bridge (tracing-log feature).
    let _ = r;
}

/// aya's "object BTF couldn't be loaded" warning is harmless here (see
/// ARCHITECTURE.md) and prints pages of BTF dump, so aya's loader logs only errors.
const DEFAULT_FILTER: &str = "info,aya::bpf=error";
