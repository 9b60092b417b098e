//! [`ClickHouse`]: a real ClickHouse server (Debian's 18.16) for the audit,
//! queried over HTTP with [`curl`]; the chdb python for the modern dialect.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::free_port;
use crate::{
    agent::spec::AgentSpec,
    curl::curl,
    util::{in_dev_cache, must_exist},
};

/// A real ClickHouse server (Debian's 18.16) on loopback ports, with its data
/// in a temporary directory; stopped on drop. Users: `default` (read-write)
/// and `reader` (profile `readonly`).
pub struct ClickHouse {
    pub dir: tempfile::TempDir,
    pub http_port: u16,
    child: Option<Child>,
}

impl ClickHouse {
    pub fn start() -> ClickHouse {
        let dir = tempfile::Builder::new()
            .prefix("lgt-ch-")
            .tempdir()
            .expect("tempdir");
        let http_port = free_port();
        let tcp_port = free_port();
        let d = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("log")).unwrap();
        std::fs::write(
            dir.path().join("users.xml"),
            r#"<?xml version="1.0"?>
<yandex>
  <profiles>
    <default><max_memory_usage>4000000000</max_memory_usage></default>
    <readonly><readonly>1</readonly></readonly>
  </profiles>
  <users>
    <default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></default>
    <reader><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>readonly</profile><quota>default</quota></reader>
  </users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("config.xml"),
            format!(
                r#"<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{d}/log/server.log</log><errorlog>{d}/log/server.err.log</errorlog><size>100M</size><count>2</count></logger>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path>
  <tmp_path>{d}/data/tmp/</tmp_path>
  <user_files_path>{d}/data/user_files/</user_files_path>
  <format_schema_path>{d}/data/format_schemas/</format_schema_path>
  <users_config>{d}/users.xml</users_config>
  <mark_cache_size>536870912</mark_cache_size>
</yandex>
"#
            ),
        )
        .unwrap();
        let mut ch = ClickHouse {
            dir,
            http_port,
            child: None,
        };
        ch.spawn();
        ch
    }

    /// Starts the server (again, on the same data).
    pub fn spawn(&mut self) {
        let child = Command::new("/usr/sbin/clickhouse-server")
            .arg(format!(
                "--config-file={}",
                self.dir.path().join("config.xml").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start clickhouse-server (cargo xtask setup installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.try_query("SELECT 1").is_err() {
            assert!(Instant::now() < deadline, "clickhouse-server did not start");
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// POSTs `sql` with [`curl`]; `out` receives the raw answer when given.
    /// Returns the HTTP status (0: no answer) and the answer.
    fn post(&self, sql: &str, out: Option<&Path>) -> (u16, String) {
        assert!(!sql.starts_with('@'), "curl would read {sql} as a file");
        let url = format!("{}/?output_format_json_quote_64bit_integers=0", self.url());
        let out = out.map(|p| p.display().to_string());
        // No time limit of its own before (a slow query is not a failure).
        let mut args = vec!["-m", "600", "--data-binary", sql];
        if let Some(p) = &out {
            args.extend(["-o", p.as_str()]);
        }
        args.push(&url);
        curl(&args)
    }

    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        match self.post(sql, None) {
            (200..=399, body) => Ok(body),
            (0, _) => Err(format!("no answer from {}", self.url())),
            (code, body) => Err(format!("HTTP {code}: {body}")),
        }
    }

    pub fn query(&self, sql: &str) -> String {
        self.try_query(sql)
            .unwrap_or_else(|e| panic!("query failed: {sql}\n{e}"))
    }

    /// A single number.
    pub fn count(&self, sql: &str) -> u64 {
        self.try_query(sql)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until `sql` returns `want`.
    pub fn wait_count(&self, sql: &str, want: u64, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let n = self.count(sql);
            if n == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out: `{sql}` is {n}, want {want}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs a query and writes its raw output to `path`.
    pub fn query_to_file(&self, sql: &str, path: &Path) {
        let (code, body) = self.post(sql, Some(path));
        assert!(
            (200..=399).contains(&code),
            "export failed: {sql}: HTTP {code} {body}"
        );
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl AgentSpec {
    /// An `[audit]` section pointing at `ch` (plus extra keys).
    pub fn clickhouse(self, ch: &ClickHouse, extra: &str) -> Self {
        self.raw(&format!(
            "\n[audit]\nclickhouse_url = \"{}\"\ndatabase = \"loopgate\"\n{extra}\n",
            ch.url()
        ))
    }
}

/// The chdb-core venv python (`cargo xtask setup` creates it).
pub fn chdb_python() -> PathBuf {
    must_exist(
        std::env::var("LOOPGATE_CHDB_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|_| in_dev_cache("chdb-venv/bin/python")),
    )
}

/// The fenced ```sql blocks of a Markdown file.
pub fn sql_blocks(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in markdown.lines() {
        match (&mut cur, line.trim()) {
            (None, "```sql") => cur = Some(String::new()),
            (Some(q), "```") => {
                out.push(q.trim().to_owned());
                cur = None;
            }
            (Some(q), _) => {
                q.push_str(line);
                q.push('\n');
            }
            _ => {}
        }
    }
    out
}
