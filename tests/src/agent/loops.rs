//! [`Loop`]: a long-lived tagged loop that makes one connection per `go()`.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    process::{Child, ChildStdout},
};

use super::Agent;

/// The loop's script: one connect + round trip per line on stdin; prints
/// `ok`, `closed <what came back>` or `error <errno>` for each.
const PERSISTENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for line in sys.stdin:
    try:
        s = socket.create_connection((host, port), timeout=30)
        s.settimeout(30)
        s.sendall(b"ping")
        data = s.recv(4)
        s.close()
        print("ok" if data == b"ping" else "closed %r" % data, flush=True)
    except OSError as e:
        print("error", e.errno, flush=True)
"#;

/// A tagged loop (`/usr/bin/python3` through `loopgate exec`) that connects
/// to `addr`, sends `ping` and reads the echo once per [`Loop::go`]. Killed
/// on drop.
pub struct Loop {
    pub child: Child,
    out: BufReader<ChildStdout>,
}

impl Loop {
    /// As the default loop user (nobody).
    pub fn start(agent: &Agent, workload: &str, addr: SocketAddr) -> Loop {
        Self::spawn(agent, workload, &[], addr)
    }

    /// As `user` (`loopgate exec --user`).
    pub fn start_as(agent: &Agent, workload: &str, user: &str, addr: SocketAddr) -> Loop {
        Self::spawn(agent, workload, &["--user", user], addr)
    }

    fn spawn(agent: &Agent, workload: &str, exec_flags: &[&str], addr: SocketAddr) -> Loop {
        let script = agent.path("persistent.py");
        std::fs::write(&script, PERSISTENT).unwrap();
        let mut child = agent.spawn_exec_with(
            workload,
            exec_flags,
            &[
                "/usr/bin/python3",
                script.to_str().unwrap(),
                &addr.ip().to_string(),
                &addr.port().to_string(),
            ],
        );
        let out = BufReader::new(child.stdout.take().unwrap());
        Loop { child, out }
    }

    /// Asks for one more connection.
    pub fn go(&mut self) {
        writeln!(self.child.stdin.as_mut().unwrap(), "go").unwrap();
    }

    /// The next connection's result line (`ok`, `closed ...`, `error N`).
    pub fn answer(&mut self) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }

    /// [`Loop::go`], then [`Loop::answer`].
    pub fn ask(&mut self) -> String {
        self.go();
        self.answer()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
