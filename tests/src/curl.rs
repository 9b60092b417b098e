//! The one curl runner of the tests: `curl -sS -m 20 -w '\n%{http_code}'
//! ARGS...`, run by the test process itself ([`curl()`], untagged) or by a
//! tagged loop ([`Agent::curl`]). Both give the HTTP status (0 when no answer
//! came: refused, reset, timed out) and the body. A `-m` in ARGS replaces
//! the 20 s limit (curl takes the last one).

use std::process::{Command, Output};

use crate::{agent::Agent, util::stdout};

/// What every run gets: quiet but with errors, a time limit, and the status
/// on a line of its own after the body.
const FLAGS: [&str; 5] = ["-sS", "-m", "20", "-w", "\n%{http_code}"];

/// curl run by the test process (not tagged): (HTTP status, body).
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(FLAGS)
        .args(args)
        .output()
        .expect("run curl");
    status_and_body(&out)
}

impl Agent {
    /// curl as a tagged loop of `workload` (`loopgate exec`): (HTTP status,
    /// body).
    pub fn curl(&self, workload: &str, args: &[&str]) -> (u16, String) {
        let mut argv = vec!["curl"];
        argv.extend(FLAGS);
        argv.extend_from_slice(args);
        status_and_body(&self.exec(workload, &argv))
    }
}

/// Splits `-w '\n%{http_code}'` off the end of what curl printed.
fn status_and_body(out: &Output) -> (u16, String) {
    let text = stdout(out);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}
