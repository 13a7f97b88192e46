"""The router's compiled path through the real `segue run` between two
subprocess backends: a plain bridge's copies are written by C as the
canonical JSON line the codec would write (texts with quotes, backslashes,
control characters and non-ASCII intact), carry their provenance, arrive in
order, and land in the store's message log and id map; the router's
counters say C carried them."""
import json
import os
import shutil
import sqlite3
import subprocess
import unittest

from harness import SEGUE, PYTHON, tmpdir, write, wait_for

# src: once asked to RoomJoin "#go", says the texts of TEXTS (a JSON file) in
# "#x". dst: answers every request and appends each request line, as it
# came, to RAW.
BACKEND = r"""
import json, sys
mode, arg = sys.argv[1], sys.argv[2]
out = sys.stdout
out.write(json.dumps({"backend_name": "raw", "backend_version": [0, 0, 1],
                      "protocol_version": [0, 1, 0]}) + "\n")
out.flush()
raw = open(arg, "a", buffering=1) if mode == "dst" else None
sent = 0
for line in sys.stdin:
    if raw is not None:
        raw.write(line)
    req = json.loads(line)
    seq, body = req["sequence_number"], req["body"]
    kind = body["type"]
    if kind == "RoomLookup":
        answer = {"type": "RoomID", "value": body["value"]}
    elif kind == "RoomJoin":
        answer = {"type": "Success", "value": None}
    elif kind == "MessageSend":
        sent += 1
        answer = {"type": "MessageID", "value": "copy%d" % sent}
    else:
        answer = {"type": "Error", "value": {"message": "no", "retry": False}}
    out.write(json.dumps({"sequence_number": seq, "body": answer}) + "\n")
    out.flush()
    if mode == "src" and kind == "RoomJoin" and body["value"] == "#go":
        with open(arg) as f:
            texts = json.load(f)
        for i, t in enumerate(texts, 1):
            out.write(json.dumps({"type": "MessageUpsert", "value": {
                "id": "m%d" % i, "sender": "u\"1", "recipient": "#x", "attachments": [],
                "content": {"type": "Text", "value": t}, "create_time": 5, "edit_time": 5}}) + "\n")
        out.flush()
"""

# Starts src once the rooms are resolved and the table is filled; writes the
# router's counters. No "update" handler: the router alone listens.
SCRIPT = r"""
local segue = require "segue"
local router = require "segue.router"
local started, ticks = false, 0
segue.every(20, function()
  if router.ready() then ticks = ticks + 1 end
  if not started and ticks > 2 then
    started = true
    segue.backend("src"):request({ type = "RoomJoin", value = "#go" }, function() end)
  end
  local s = router.status
  local f = io.open("counters.tmp", "w")
  f:write(segue.json.encode { bridged = s.bridged, lost = s.lost, compiled = s.compiled }) f:close()
  os.rename("counters.tmp", "counters.json")
end)
"""

SPECIAL = ["plain", "quote \" and backslash \\ and slash /", "new\nline\ttab\rcr", "bell \x07 \x1f",
           "caf\u00e9 \u2603 \U0001F600", "</script><b>", "{\"json\": [1, 2]}", ""]
N = 2000


class CompiledPath(unittest.TestCase):
    def test_copies_are_canonical_lines_in_order_with_provenance_and_logged(self):
        d = tmpdir()
        self.addCleanup(shutil.rmtree, d, True)
        texts = SPECIAL + ["m %d" % i for i in range(len(SPECIAL) + 1, N + 1)]
        raw = os.path.join(d, "raw.jsonl")
        write(os.path.join(d, "texts.json"), json.dumps(texts))
        write(os.path.join(d, "chat.py"), BACKEND)
        write(os.path.join(d, "go.lua"), SCRIPT)
        write(os.path.join(d, "rules.lua"), 'return { bridge { "src:#x", "dst:#x" } }\n')
        chat = json.dumps(os.path.join(d, "chat.py"))
        write(os.path.join(d, "cfg.lua"), """
data_dir = "data"
backends = {
  src = { cmd = %s, args = { %s, "src", "texts.json" } },
  dst = { cmd = %s, args = { %s, "dst", "raw.jsonl" } },
}
rules = "rules.lua"
scripts = { "go.lua" }
""" % (json.dumps(PYTHON), chat, json.dumps(PYTHON), chat))
        p = subprocess.Popen([SEGUE, "-q", "run", "cfg.lua"], cwd=d, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: p.poll() is None and p.kill())

        def counters():
            try:
                with open(os.path.join(d, "counters.json")) as f:
                    return json.load(f)
            except (FileNotFoundError, ValueError):
                return {}

        self.assertTrue(wait_for(lambda: counters().get("bridged") == N, 120), counters())
        p.terminate()
        _, err = p.communicate(timeout=30)
        self.assertEqual(p.returncode, 0, err)
        c = counters()
        self.assertEqual(c["lost"], 0)
        self.assertEqual(c["compiled"], N, "C carried every message")

        with open(raw, encoding="utf-8") as f:
            lines = [l for l in f.read().split("\n") if '"MessageSend"' in l]
        self.assertEqual(len(lines), N)
        for i, line in enumerate(lines, 1):
            req = json.loads(line)
            want = {"sequence_number": req["sequence_number"], "body": {"type": "MessageSend", "value": {
                "recipient": "#x", "attachments": [],
                "content": {"type": "Concat", "value": [{"type": "Text", "value": "<u\"1@src> "},
                                                        {"type": "Text", "value": texts[i - 1]}]},
                "extra": {"segue_origin": {"backend": "src", "id": "m%d" % i}}}}}
            # the codec's canonical text: no spaces, fields in order, UTF-8 as it is
            self.assertEqual(line, json.dumps(want, separators=(",", ":"), ensure_ascii=False), i)

        db = sqlite3.connect(os.path.join(d, "data", "segue.db"))
        self.addCleanup(db.close)
        rows = db.execute("SELECT origin_backend, origin_id, copy_backend, copy_id, room FROM msg_map"
                          " ORDER BY rowid").fetchall()
        self.assertEqual(len(rows), N)
        self.assertEqual(rows[0], ("src", "m1", "dst", "copy1", "#x"))
        logged = dict(db.execute("SELECT id, content_json FROM messages WHERE backend = 'src'").fetchall())
        self.assertEqual(len(logged), N)
        for i in (1, 2, 3, 5, N):
            self.assertEqual(json.loads(logged["m%d" % i]), {"type": "Text", "value": texts[i - 1]})


if __name__ == "__main__":
    unittest.main()
