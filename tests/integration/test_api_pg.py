"""Several segue instances on one PostgreSQL share what they must
(docs/scaling.md, docs/api.md), against a real PostgreSQL 15 started here
(pg_server.py):
- the client API is served by every instance: a user made with `segue user`
  on a PostgreSQL config logs in on each; a message routed by the instance
  running the backends reaches the live stream of a client connected to the
  other one, and Last-Event-ID playback works there too;
- the rules' `state` table survives a takeover, after `kill -9` of the owner
  and after a clean stop;
- `segue watch` on a PostgreSQL config shows the flow of whichever instance
  routes, also after a takeover."""
import json
import os
import re
import signal
import subprocess
import threading
import time
import unittest

import pg_server
from api_util import Api, q
from test_api import OLD_BACKEND, texts
from harness import SEGUE, PYTHON, LogTail, inject_lua, run, say, wait_for, whole_lines, write

LEASE_MS = 4000
HERE = os.path.dirname(os.path.abspath(__file__))
STREAM = os.path.join(HERE, "stream_backend.py")



class Node(Api):
    """An API client of one instance (Api's request helpers, no process)."""

    def __init__(self, test, port, admin):
        self.test, self.port, self.admin = test, port, admin


class Shared(pg_server.SegueDbTest):
    sql_check = False

    def setUp(self):
        super().setUp()
        self.procs = {}
        self.addCleanup(self.stop_all)

    def lock(self, table):
        """Holds a lock on `table` that blocks writes to it (reads go on)
        until the returned function is called: the store's writes wait."""
        p = subprocess.Popen(["psql", "-X", "-q", "-A", "-t", "-d", self.dsn], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        p.stdin.write("BEGIN; LOCK TABLE %s IN SHARE MODE; SELECT 'locked';\n" % table)
        p.stdin.flush()
        self.assertEqual(p.stdout.readline().strip(), "locked")

        def release():
            if p.poll() is None:
                p.stdin.write("COMMIT;\n")
                p.stdin.close()
                p.wait(30)
                p.stdout.close()
        self.addCleanup(release)
        return release

    def config(self, name, body):
        return write(os.path.join(self.dir, name + ".lua"), """
data_dir = %s
instance = %s
lease_ms = %d
store = { engine = "postgresql", dsn = %s }
%s
""" % (json.dumps(os.path.join(self.dir, "data-" + name)), json.dumps(name), LEASE_MS,
       json.dumps(self.dsn), body))

    def start(self, name):
        p = subprocess.Popen([SEGUE, "run", name + ".lua"], cwd=self.dir, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        self.procs[name] = (p, LogTail(p))
        return self.procs[name][1]

    def log(self, name):
        return self.procs[name][1].text()

    def logs(self):
        return "\n".join("--- %s\n%s" % (n, self.log(n)) for n in self.procs)

    def stop_all(self):
        for p, tail in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            tail.thread.join(5)
            p.stderr.close()

    def owner(self, names):
        """The instance holding the backends lease, once one runs them."""
        found = {}

        def look():
            for n in names:
                if n in self.procs and self.procs[n][0].poll() is None and \
                        "instance %s took backend" % n in self.log(n) and \
                        self.sql("SELECT holder FROM leases WHERE name = 'backends'") == n:
                    found["n"] = n
                    return True
            return False
        self.assertTrue(wait_for(look, 60), self.logs())
        return found["n"]

    def user_add(self, cfg, name, admin=False):
        r = run(["user", "add", name] + (["--admin"] if admin else []) + [cfg], cwd=self.dir, timeout=90)
        self.assertEqual(r.code, 0, r.stderr)
        m = re.search(r"^token (\S+)$", r.stdout, re.M)
        self.assertIsNotNone(m, r.stdout)
        return m.group(1)

    # ---- the client API on every instance ------------------------------------

    def test_the_api_on_two_instances(self):
        write(os.path.join(self.dir, "inject.lua"), inject_lua(only_running=True))
        write(os.path.join(self.dir, "rules.lua"), 'return { bridge { "a:#general", "b:#general" } }\n')
        write(os.path.join(self.dir, "old_backend.lua"), OLD_BACKEND)
        body = ('backends = { a = { script = "memory" }, b = { script = "memory" },'
                ' old = { script = "old_backend.lua" } }\n'
                'rules = "rules.lua"\nscripts = { "inject.lua" }\nhttp = { listen = "127.0.0.1:0" }\n')
        for n in ("i1", "i2"):
            self.config(n, body)
        # `segue user` on a PostgreSQL config: the shared database, not data_dir.
        root = self.user_add("i1.lua", "root", admin=True)
        self.assertEqual(self.sql("SELECT name, admin FROM api_users"), "root|1")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "data-i1", "segue.db")))
        nodes = {}
        for n in ("i1", "i2"):
            tail = self.start(n)
            self.assertTrue(tail.wait_for("api: listening", 60), self.logs())
            port = int(re.search(r"api: listening on \S+ \(port (\d+)\)", tail.text()).group(1))
            nodes[n] = Node(self, port, root)
            self.assertTrue(tail.wait_for("running with", 60), self.logs())
        owner = self.owner(("i1", "i2"))
        other = "i2" if owner == "i1" else "i1"
        on, off = nodes[owner], nodes[other]

        # A user made on one instance's config logs in on both.
        bob = self.user_add(other + ".lua", "bob")
        for node in (on, off):
            status, _, rooms = node.get("/api/v1/rooms", token=bob)
            self.assertEqual(status, 200, rooms)
        r = run(["user", "list", owner + ".lua"], cwd=self.dir, timeout=90)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertEqual([l.split()[0] for l in r.stdout.splitlines()], ["bob", "root"])

        # /metrics on either instance shows the postbox's queues of the
        # shared store (asked without blocking: the store answers later).
        self.sql("INSERT INTO peers(server_id, first_seen) VALUES ('peer.example', 0);"
                 "INSERT INTO outbox(peer, event, created) VALUES ('peer.example', '\\x01', 0),"
                 " ('peer.example', '\\x02', 0)")
        for node in (on, off):
            status, _, text = node.get("/metrics")
            self.assertEqual(status, 200, text)
            self.assertIn('segue_postbox_queue_depth{peer="peer.example"} 2', text)

        # The rooms the owner's backends announced are known on the other.
        room = off.room_id("a", "#general", 60)
        self.assertEqual(on.room_id("a", "#general", 60), room)

        # A message routed by the owner reaches a stream on the other instance.
        s = off.stream(token=bob)
        self.assertEqual(s.status, 200, s.head)
        say(self.dir, "a", "#general", "alice", "hello there")

        def said(events, text, backend="a"):
            return [e for e in events if e["event"] == "MessageUpsert" and e["data"]["backend"] == backend
                    and text in json.dumps(e["data"]["value"].get("content"))]
        got = []
        self.assertTrue(wait_for(lambda: got.extend(s.events(1, 1)) or (said(got, "hello there")
                                 and said(got, "hello there", "b")), 30), (got, self.logs()))
        first = said(got, "hello there")[0]
        last_id = max(e["id"] for e in got)
        s.close()

        # The message log is shared: the other instance pages it.
        status, _, page = off.get(off.messages_path("a", room), token=bob)
        self.assertEqual(status, 200, page)
        self.assertIn("hello there", [m["content"]["value"] for m in page["messages"]])
        status, _, rooms = off.get("/api/v1/rooms", token=bob)
        self.assertEqual([x["unread"] for x in rooms if x["backend"] == "a" and x["id"] == room], [0])

        # Missed while disconnected: replayed on the other instance from Last-Event-ID.
        say(self.dir, "a", "#general", "alice", "while away")
        self.assertTrue(wait_for(lambda: "while away" in json.dumps(on.get(on.messages_path("a", room))[2]), 30))
        s = off.stream(token=bob, last_event_id=first["id"])
        replay = s.events(20, 5)
        s.close()
        self.assertTrue(all(e["id"] > first["id"] for e in replay), replay)
        self.assertTrue(said(replay, "while away"), replay)
        self.assertEqual([e["id"] for e in replay], sorted(e["id"] for e in replay))
        self.assertIn(last_id, [e["id"] for e in replay] + [first["id"]])

        # A send on the instance that does not run the backends goes to the
        # one that does (forwarded with the caller's token): the message is
        # said in a:#general and bridged to b.
        status, _, sent = off.post(off.messages_path("a", room), {"text": "sent via the other"}, token=bob)
        self.assertEqual(status, 201, (sent, self.logs()))
        self.assertTrue(wait_for(lambda: "sent via the other" in json.dumps(
            on.get(on.messages_path("b", on.room_id("b", "#general")))[2]), 30), self.logs())
        line = "api: bob sent %s to a:%s" % (sent["id"], room)
        self.assertTrue(wait_for(lambda: line in self.log(owner), 10), self.log(owner))  # read by a thread
        status, _, body = off.post(off.messages_path("a", room), {"text": "x"}, token="sgt_nope")
        self.assertEqual(status, 401, body)
        status, _, body = off.post(off.messages_path("nope", room), {"text": "x"}, token=bob)
        self.assertEqual(status, 404, body)

        # History older than the shared log comes from the backend, through
        # the instance running it.
        path = off.messages_path("old", "#hist")
        self.assertTrue(wait_for(lambda: len(off.get(path)[2]["messages"]) == 1, 30), self.logs())
        newest = off.get(path)[2]["messages"][0]
        page = off.get(off.messages_path("old", "#hist", limit=10, before=newest["id"]))[2]["messages"]
        self.assertEqual(texts(page), ["old %d" % i for i in range(20, 30)])

        # /status on any instance: every instance and the lease.
        status, _, st = off.get("/status")
        self.assertEqual(status, 200, st)
        self.assertEqual(st["engine"], "postgresql")
        self.assertEqual(sorted(i["name"] for i in st["instances"]), ["i1", "i2"])
        self.assertEqual([(l["name"], l["holder"]) for l in st["leases"]], [("backends", owner)])

        # Removed through one instance's config: refused by both at once.
        r = run(["user", "remove", "bob", owner + ".lua"], cwd=self.dir, timeout=90)
        self.assertEqual(r.code, 0, r.stderr)
        for node in (on, off):
            status, _, body = node.get("/api/v1/rooms", token=bob)
            self.assertEqual(status, 401, body)
        r = run(["user", "add", "root", other + ".lua"], cwd=self.dir, timeout=90)
        self.assertEqual(r.code, 1)
        self.assertIn("a user of that name exists", r.stderr)


    # ---- stream backends: a chat service in files (stream_backend.py) -------

    def stream_config(self, name, rules):
        self.a_in = os.path.join(self.dir, "a.in")
        self.b_out = os.path.join(self.dir, "b.out")
        write(os.path.join(self.dir, "rules.lua"), rules)
        return self.config(name, """
rules = "rules.lua"
backends = {
  a = { cmd = %s, args = { %s, "--in=%s" } },
  b = { cmd = %s, args = { %s, "--out=%s" } },
}
""" % (json.dumps(PYTHON), json.dumps(STREAM), self.a_in, json.dumps(PYTHON), json.dumps(STREAM), self.b_out))

    def say(self, mid, text, t):
        with open(self.a_in, "a") as f:
            f.write(json.dumps({"id": mid, "text": text, "t": t}) + "\n")

    def copies(self):
        """What b received: {origin id: [texts]}, and the texts in order."""
        out = []
        for l in whole_lines(self.b_out):
            c = json.loads(l)
            v = c["content"]["value"]  # the prefix and the text: a list of Text
            out.append((c["origin"]["id"], v if isinstance(v, str) else "".join(x["value"] for x in v)))
        return out

    def bridged(self, mid):
        """The texts of the copies of `mid`, without the bridge's prefix."""
        return [re.sub(r"^<u@a> ", "", t) for i, t in self.copies() if i == mid]

    def kill9(self, name):
        p, _ = self.procs[name]
        p.send_signal(signal.SIGKILL)
        p.wait()

    def stored_state(self):
        v = self.sql("SELECT value FROM kv WHERE key = 'rules.state'")
        return json.loads(v) if v else None

    def test_rules_state_survives_kill_9_and_a_clean_stop(self):
        # Each copy says how many messages the rules have counted so far, in
        # `state`, and keeps a list and a function there: the list is kept,
        # the function is not (and says so in the log).
        rules = """return {
  bridge { "a:#s", "b:#s", rewrite = function(msg, ctx)
    ctx.state.n = (ctx.state.n or 0) + 1
    ctx.state.seen = ctx.state.seen or {}
    table.insert(ctx.state.seen, ctx.text)
    ctx.state.fn = function() end
    msg.content = { type = "Text", value = ctx.text .. " #" .. ctx.state.n }
    return msg
  end },
}
"""
        for n in ("i1", "i2", "i3"):
            self.stream_config(n, rules)
        self.start("i1")
        self.assertEqual(self.owner(("i1",)), "i1")
        self.start("i2")
        self.assertTrue(self.procs["i2"][1].wait_for("running with", 60), self.logs())
        t = 1000
        for i in range(1, 4):
            self.say("m%d" % i, "one%d" % i, t + i)
        self.assertTrue(wait_for(lambda: self.bridged("m3"), 30), self.logs())
        self.assertEqual([self.bridged("m%d" % i) for i in range(1, 4)], [["one1 #1"], ["one2 #2"], ["one3 #3"]])
        # Written at a renewal (lease_ms / 3) without the function.
        self.assertTrue(wait_for(lambda: (self.stored_state() or {}).get("n") == 3, 20), self.logs())
        self.assertEqual(self.stored_state(), {"n": 3, "seen": ["one1", "one2", "one3"]})
        self.assertTrue(self.procs["i1"][1].wait_for("rules state: not kept across instances: state.fn (function)", 20), self.log("i1"))

        # kill -9 of the owner: i2 takes over with the state i1 left.
        self.kill9("i1")
        self.assertEqual(self.owner(("i2",)), "i2")
        self.assertTrue(self.procs["i2"][1].wait_for("rules state loaded", 20), self.log("i2"))
        self.say("m4", "two", t + 4)
        self.assertTrue(wait_for(lambda: self.bridged("m4"), 30), self.logs())
        self.assertEqual(self.bridged("m4"), ["two #4"])

        # A clean stop writes the state as it releases the lease: i3 goes on
        # from there, even for a message counted just before the stop.
        # m5's id map is written just before the stop: it waits for a lock
        # (and every write of i2 after it, the state's too) until i2 stops.
        self.start("i3")
        self.assertTrue(self.procs["i3"][1].wait_for("running with", 60), self.logs())
        release = self.lock("msg_map")
        self.say("m5", "three", t + 5)
        self.assertTrue(wait_for(lambda: self.bridged("m5"), 30), self.logs())
        p, _ = self.procs["i2"]
        p.send_signal(signal.SIGTERM)
        self.assertTrue(self.procs["i2"][1].wait_for("stopping (signal", 20), self.log("i2"))
        release()
        self.assertEqual(p.wait(30), 0, self.log("i2"))
        # What i2 wrote just before the stop is in the store, whatever the
        # timing: the stop waits for the store's answers (docs/scaling.md, "a
        # clean stop"). The state counted m5, and m5's copy has its id map
        # (without it, i3 would bridge m5 again when a replays it).
        self.assertNotIn("dropped", self.log("i2"))
        self.assertEqual(self.stored_state()["n"], 5)
        self.assertEqual(self.sql("SELECT count(*) FROM msg_map WHERE origin_id = 'm5'"), "1",
                         self.log("i2"))
        self.assertEqual(self.owner(("i3",)), "i3")
        self.say("m6", "four", t + 6)
        self.assertTrue(wait_for(lambda: self.bridged("m6"), 30), self.logs())
        self.assertEqual(self.bridged("m6"), ["four #6"])
        # Nothing was bridged twice through the takeovers.
        ids = [i for i, _ in self.copies()]
        self.assertEqual(ids, ["m1", "m2", "m3", "m4", "m5", "m6"])

    # ---- segue watch ---------------------------------------------------------

    def test_watch_on_postgresql_follows_whichever_instance_routes(self):
        for n in ("i1", "i2"):
            self.stream_config(n, 'return { bridge { "a:#s", "b:#s" } }\n')
        self.start("i1")
        self.assertEqual(self.owner(("i1",)), "i1")
        self.start("i2")
        self.assertTrue(self.procs["i2"][1].wait_for("running with", 60), self.logs())
        # Watched through the config of the instance that does not route.
        w = subprocess.Popen([SEGUE, "watch", "i2.lua"], cwd=self.dir, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        lines, err = [], LogTail(w)

        def read():
            for line in w.stdout:
                lines.append(line)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()

        def cleanup():
            if w.poll() is None:
                w.send_signal(signal.SIGINT)
                try:
                    w.wait(10)
                except subprocess.TimeoutExpired:
                    w.kill()
                    w.wait()
            reader.join(5)
            err.thread.join(5)
            w.stdout.close()
            w.stderr.close()
        self.addCleanup(cleanup)
        self.assertTrue(err.wait_for("watching the segue instances on the postgresql store", 30),
                        err.text() + self.logs())
        self.say("w1", "first words", 2001)

        def shown(text):
            got = "".join(lines)
            return (" in      a:#s  <u> %s" % text) in got and \
                re.search(r" sent    b:#s  .*%s  bridge=bridge1 from=a  ok" % text, got)
        self.assertTrue(wait_for(lambda: shown("first words"), 30), "".join(lines) + self.logs())
        # The owner dies: the other instance routes, the watch goes on.
        self.kill9("i1")
        self.assertEqual(self.owner(("i2",)), "i2")
        self.say("w2", "after the takeover", 2002)
        self.assertTrue(wait_for(lambda: shown("after the takeover"), 30), "".join(lines) + self.logs())
        self.assertNotIn("missed", "".join(lines))


if __name__ == "__main__":
    unittest.main()
