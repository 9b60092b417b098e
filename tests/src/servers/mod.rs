//! Real servers on loopback addresses for loops to reach: one module each.

pub mod clickhouse;
pub mod echo;
pub mod http;
pub mod postgres;
pub mod ssh;

use std::net::TcpListener;

/// A free TCP port on 127.0.0.1 (and, in practice, ::1).
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().unwrap().port();
        drop(l);
        if TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
}
