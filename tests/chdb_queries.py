"""Runs the documented analyst queries on the modern DDL in chdb-core (a current
ClickHouse engine, in process), on data the agent recorded into ClickHouse 18.16.

Input (JSON file, argv[1]):
  {"ddl": [...], "tables": [{"name": "sessions", "file": "...", "columns": [...]}],
   "queries": [...]}
The table files are RowBinary exports of the inserted columns from 18.16: the
same bytes the agent inserts, read here with the modern column types.
Output (stdout, JSON): {"rows": [row count per query], "loaded": {table: rows}}
"""
import json
import sys

from chdb import session

spec = json.load(open(sys.argv[1]))
s = session.Session()
for stmt in spec["ddl"]:
    s.query(stmt)
loaded = {}
for t in spec["tables"]:
    types = {}
    for line in s.query(
        "SELECT name, type FROM system.columns WHERE database = 'loopgate' "
        f"AND table = '{t['name']}'", "JSONEachRow").bytes().decode().splitlines():
        c = json.loads(line)
        types[c["name"]] = c["type"]
    structure = ", ".join(f"`{c}` {types[c]}" for c in t["columns"]).replace("'", "\\'")
    cols = ", ".join(f"`{c}`" for c in t["columns"])
    s.query(f"INSERT INTO loopgate.{t['name']} ({cols}) "
            f"SELECT * FROM file('{t['file']}', 'RowBinary', '{structure}')")
    loaded[t["name"]] = int(s.query(
        f"SELECT count() FROM loopgate.{t['name']}", "TSV").bytes().decode().strip())
rows = []
for q in spec["queries"]:
    out = s.query(q, "TSV").bytes().decode()
    rows.append(len([l for l in out.splitlines() if l.strip()]))
print(json.dumps({"rows": rows, "loaded": loaded}))
