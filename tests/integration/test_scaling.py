"""Several segue instances on one PostgreSQL (docs/scaling.md), against a
real PostgreSQL 15 started here (pg_server.py): three instances share two
subprocess backends, which run on exactly one instance (the holder of the
lease "backends": all together, so copies between them stay in one process),
`segue status` shows every instance and what it owns, `kill -9` of the
instance owning a backend hands it to another within the lease time, and
`segue migrate` applies the schema. The postbox on PostgreSQL: three
instances speaking for one server id behind a failover proxy exchange
events with an independent segue (SQLite) while one instance is killed
with -9 and while PostgreSQL restarts: nothing acknowledged is lost, per
producer the order holds, each instance's `segue key` prints one key."""
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import unittest

import pg_server
import socket
from harness import SEGUE, FAKE, PYTHON, live_processes, run, write, wait_for, free_port
from postbox_util import PostboxNode
from stream_backend import bridged, out_lines, users_say_until

# An instance stops its backends when it could not renew for 80% of the
# lease (renewals every lease_ms / 3); 1 s let a loaded machine under ASan
# stall a renewal that long, so the lease moved and backend a started twice
# before the kill. 4 s keeps the takeover well inside the bounds below.
LEASE_MS = 4000


def running_backends(marker):
    """How many copies of the backend whose state file is `marker` run now."""
    return live_processes(marker)


class Proxy:
    """The load balancer in front of the instances: each connection goes to
    the next live backend (round robin; one that refuses is skipped)."""

    def __init__(self, ports):
        self.ports = ports
        self.next = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        up = None
        for _ in range(len(self.ports)):
            port = self.ports[self.next % len(self.ports)]
            self.next += 1
            try:
                up = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                up = None
        if up is None:
            c.close()
            return
        up.settimeout(None)

        def pipe(a, b):
            try:
                while True:
                    d = a.recv(65536)
                    if not d:
                        break
                    b.sendall(d)
            except OSError:
                pass
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        t = threading.Thread(target=pipe, args=(up, c), daemon=True)
        t.start()
        pipe(c, up)
        t.join(30)
        c.close()
        up.close()

    def close(self):
        self.closed = True
        self.sock.close()


S, P = "s.example:2289", "p.example:2289"
FAST = {"push_tries": 2, "push_backoff_ms": 20, "pull_interval_ms": 500, "pull_backoff_ms": 100}


class Scaling(pg_server.SegueDbTest):
    def setUp(self):
        super().setUp()
        self.procs = {}
        self.addCleanup(self.stop_all)
        self.states = {b: os.path.join(self.dir, "state-" + b) for b in ("a", "b")}

    def config(self, name, stream=False):
        d = os.path.join(self.dir, name)
        if stream:
            return self.stream_config(name)
        backends = ",\n".join(
            '  %s = { cmd = %s, args = { %s, "--state=%s" } }' % (b, json.dumps(PYTHON), json.dumps(FAKE), self.states[b])
            for b in ("a", "b"))
        return write(os.path.join(self.dir, name + ".lua"), """
data_dir = %s
instance = %s
lease_ms = %d
store = { engine = "postgresql", dsn = %s }
backends = {
%s
}
""" % (json.dumps(d), json.dumps(name), LEASE_MS, json.dumps(self.dsn), backends))

    def stream_config(self, name):
        """Backends a and b (stream_backend.py: their chat service is a file
        each, replayed by a new backend process, b's copies with their ids and
        `extra`; b answers each copy 40 ms after it posted it, so copies are
        always in flight), bridged a:#s -> b:#s by the rules."""
        d = os.path.join(self.dir, name)
        stream = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stream_backend.py")
        rules = write(os.path.join(self.dir, "rules.lua"), 'return {\n  bridge { "a:#s", "b:#s" },\n}\n')
        return write(os.path.join(self.dir, name + ".lua"), """
data_dir = %s
instance = %s
lease_ms = %d
store = { engine = "postgresql", dsn = %s }
rules = %s
backends = {
  a = { cmd = %s, args = { %s, "--in=%s", "--state=%s" } },
  b = { cmd = %s, args = { %s, "--out=%s", "--reply-ms=40", "--state=%s" } },
}
""" % (json.dumps(d), json.dumps(name), LEASE_MS, json.dumps(self.dsn), json.dumps(rules),
       json.dumps(PYTHON), json.dumps(stream), self.a_in, self.states["a"],
       json.dumps(PYTHON), json.dumps(stream), self.b_out, self.states["b"]))

    def start(self, name, stream=False):
        log = open(os.path.join(self.dir, name + ".log"), "wb")
        self.procs[name] = (subprocess.Popen([SEGUE, "run", self.config(name, stream)], stdout=log,
                                             stderr=subprocess.STDOUT), log)

    def stop_all(self):
        for p, log in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            log.close()
        # Backends of a killed instance see their stdin close and exit.
        wait_for(lambda: all(running_backends(s) == 0 for s in self.states.values()), 20)

    def log(self, name):
        with open(os.path.join(self.dir, name + ".log"), errors="replace") as f:
            return f.read()

    def status(self, name="i1"):
        r = run(["status", os.path.join(self.dir, name + ".lua")], timeout=60)
        self.assertEqual(r.code, 0, r.stderr)
        return json.loads(r.stdout)

    def owners(self):
        """backend -> (holder, state there) from `segue status`."""
        st = self.status()
        out = {}
        now_alive = {i["name"]: i for i in st["instances"] if i["alive"]}
        for lease in st["leases"]:
            self.assertEqual(lease["name"], "backends")
            inst = now_alive.get(lease["holder"])
            for b in (inst or {}).get("backends", []):
                out[b] = (lease["holder"], (inst.get("states") or {}).get(b))
        return out

    def all_running(self, exclude=()):
        o = self.owners()
        return (set(o) == {"a", "b"} and all(s == "running" for _, s in o.values())
                and not any(h in exclude for h, _ in o.values()))

    def test_migrate_status_one_owner_per_backend_and_takeover_after_kill_9(self):
        r = run(["migrate", self.config("i1")], timeout=60)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertIn("postgresql: schema at version 5", r.stdout)
        self.assertEqual(self.sql("SELECT version FROM segue_schema"), "5")
        for name in ("i1", "i2", "i3"):
            self.start(name)
        self.assertTrue(wait_for(self.all_running, 60), self.log("i1") + self.log("i2"))
        st = self.status()
        self.assertEqual(sorted(i["name"] for i in st["instances"]), ["i1", "i2", "i3"])
        self.assertTrue(all(i["alive"] for i in st["instances"]))
        # Each backend runs once, on the instance holding its lease, and
        # stays so while the leases are renewed.
        time.sleep(3 * LEASE_MS / 1000)
        for b in ("a", "b"):
            self.assertEqual(running_backends(self.states[b]), 1, b)
        owners = self.owners()
        self.assertEqual(owners["a"][0], owners["b"][0])  # one lease for both
        holders = {i["name"]: i["backends"] for i in self.status()["instances"]}
        for b, (h, _) in owners.items():
            self.assertIn(b, holders[h])
            self.assertEqual([n for n, bs in holders.items() if b in bs], [h])
        with open(self.states["a"]) as f:
            starts_a = f.read().count("start")
        self.assertEqual(starts_a, 1, "\n".join(self.log(n) for n in self.procs))

        # kill -9 the owner of backend a: another instance takes it over
        # once the lease expired (lease_ms, renewed every lease_ms / 3).
        victim = owners["a"][0]
        p, _ = self.procs[victim]
        t0 = time.time()
        p.send_signal(signal.SIGKILL)
        p.wait()
        self.assertTrue(wait_for(lambda: self.all_running(exclude=(victim,)), 30),
                        "\n".join(self.log(n) for n in self.procs))
        took = time.time() - t0
        self.assertLess(took, 20)
        new_owner = self.owners()["a"][0]
        self.assertNotEqual(new_owner, victim)
        self.assertIn("instance %s took backend a" % new_owner, self.log(new_owner))
        # Once the killed instance's own children noticed (stdin closed),
        # each backend runs exactly once again.
        self.assertTrue(wait_for(lambda: all(running_backends(self.states[b]) == 1 for b in ("a", "b")), 20))
        with open(self.states["a"]) as f:
            self.assertEqual(f.read().count("start"), 2)
        self.assertTrue(wait_for(lambda: not [i for i in self.status()["instances"] if i["name"] == victim][0]["alive"], 20))


    def test_a_stream_survives_kill_9_of_the_owner_nothing_lost_in_order(self):
        self.a_in = os.path.join(self.dir, "a.in")
        self.b_out = os.path.join(self.dir, "b.out")
        for name in ("i1", "i2", "i3"):
            self.start(name, stream=True)
        self.assertTrue(wait_for(self.all_running, 60), self.log("i1") + self.log("i2"))
        owner = self.owners()["a"][0]
        ids = []
        killed = threading.Event()

        # the chat service's users, on until 50 messages after the kill:
        # copies are in flight at the kill
        writer = threading.Thread(target=users_say_until, args=(self.a_in, ids, killed))
        writer.start()
        # kill -9 of the owner mid-stream, once some copies went out, at a
        # point that varies from run to run.
        self.assertTrue(wait_for(lambda: len(bridged(self.b_out)) >= 40, 30), self.log(owner))
        time.sleep(random.random() * 0.05)
        p, _ = self.procs[owner]
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed.set()
        before = bridged(self.b_out)
        writer.join()
        self.assertTrue(wait_for(lambda: self.all_running(exclude=(owner,)), 30),
                        "\n".join(self.log(x) for x in self.procs))
        new_owner = self.owners()["a"][0]
        self.assertTrue(wait_for(lambda: "the previous run did not stop cleanly" in self.log(new_owner), 30),
                        self.log(new_owner))
        # The new owner's backends replay their whole history: what was
        # bridged is recognised (the message map is in PostgreSQL, and b's
        # replay shows the copies whose ids the killed owner had not
        # recorded yet), the rest is bridged now.
        self.assertTrue(wait_for(lambda: set(bridged(self.b_out)) >= set(ids), 60),
                        "missing %r\n%s" % (sorted(set(ids) - set(bridged(self.b_out)))[:10],
                                             "\n".join(self.log(x) for x in self.procs)))
        time.sleep(2)  # a replay bridged twice would show by now
        got = bridged(self.b_out)
        self.assertEqual(got[:len(before)], before)
        # No message bridged twice, not even those in flight when the owner
        # died (b had posted them, their ids were not recorded yet): the new
        # owner held a's replay until b had replayed (docs/scaling.md).
        twice = sorted({x for x in got if got.count(x) > 1})
        self.assertEqual(twice, [], "bridged twice: %r (%d in flight at the kill)\n%s"
                         % (twice, len([x for x in twice if x in before]), self.log(new_owner)))
        # ... and there were such copies: b posted them before the kill and
        # never answered (so their ids cannot have been recorded).
        lines = out_lines(self.b_out)
        answered = {c["answered"] for c in lines if "answered" in c}
        first_b = lines[0]["id"].split(".")[0] + "."  # ids c<pid>.<n>: the first b process's
        inflight = [c["origin"]["id"] for c in lines
                    if "origin" in c and c["id"].startswith(first_b) and c["id"] not in answered]
        self.assertTrue(inflight, "no copy was in flight at the kill")
        after = got[len(before):]
        self.assertEqual(len(after), len(set(after)), "bridged twice after the kill")
        self.assertEqual(set(after) | set(before), set(ids))
        # Order: the copies in the order the messages were said.
        first = []
        for x in got:
            if x not in first:
                first.append(x)
        self.assertEqual(first, ids, "out of order")


    def test_the_database_away_stops_the_backends_and_back_they_run_again(self):
        # PostgreSQL stopped: no instance can renew, so the owner stops its
        # backends before the lease could pass to anyone (80% of lease_ms,
        # watched by a timer of its own while the renewal waits). Started
        # again: the instances reconnect and one runs the backends.
        for name in ("i1", "i2"):
            self.start(name)
        self.assertTrue(wait_for(self.all_running, 60), self.log("i1") + self.log("i2"))
        self.pg.stop()
        self.assertTrue(wait_for(lambda: all(running_backends(self.states[b]) == 0 for b in ("a", "b")),
                                 3 * LEASE_MS / 1000 + 10), self.log("i1") + self.log("i2"))
        self.assertTrue(any("its lease could not be renewed" in self.log(n) for n in ("i1", "i2")))
        self.pg.start()
        self.assertTrue(wait_for(self.all_running, 90), self.log("i1") + self.log("i2"))
        self.assertTrue(wait_for(lambda: all(running_backends(self.states[b]) == 1 for b in ("a", "b")), 30))

    # -- the postbox on PostgreSQL ------------------------------------------------

    def fed_instances(self, proxy_port, ports, p_url):
        """Three instances speaking for S (one key pair: the first one's key
        file copied to the others), each a postbox sender and handler."""
        nodes = []
        shared = os.path.join(self.dir, "s-events.jsonl")  # every handler appends here
        for i, port in enumerate(ports):
            n = PostboxNode(S, sender=True, port=port, federation=dict(FAST, peers={P: p_url}))
            n.events = n.env["FED_EVENTS"] = shared
            with open(n.config, "a") as f:
                f.write('instance = "f%d"\nlease_ms = %d\nstore = { engine = "postgresql", dsn = %s }\n'
                        % (i + 1, LEASE_MS, json.dumps(self.dsn)))
            nodes.append(n)
        r = run(["key", nodes[0].config], timeout=60, cwd=nodes[0].dir)
        self.assertEqual(r.code, 0, r.stderr)
        for n in nodes[1:]:
            os.makedirs(os.path.dirname(n.key_file()), mode=0o700, exist_ok=True)
            shutil.copyfile(nodes[0].key_file(), n.key_file())
            os.chmod(n.key_file(), 0o600)
        keys = {run(["key", n.config], timeout=60, cwd=n.dir).stdout for n in nodes}
        self.assertEqual(len(keys), 1, keys)  # `segue key`: one key on every instance
        return nodes

    def check_stream(self, got, acked_by, label):
        """Nothing acknowledged lost; per producer (ids k * 100000 + n), in
        order the first time each arrived."""
        seen = set(got)
        for k, acked in acked_by.items():
            self.assertTrue(acked <= seen, "%s: lost from f%d: %r" % (label, k, sorted(acked - seen)[:10]))
        first, s2 = {}, set()
        for x in got:
            if x not in s2:
                s2.add(x)
                first.setdefault(x // 100000, []).append(x)
        for k, xs in first.items():
            self.assertEqual(xs, sorted(xs), "%s: out of order from producer %d" % (label, k))

    def test_postbox_three_instances_kill_9_and_a_restart_of_postgresql(self):
        ports = [free_port() for _ in range(3)]
        proxy = Proxy(ports)
        self.addCleanup(proxy.close)
        proxy_url = "http://127.0.0.1:%d" % proxy.port
        p = PostboxNode(P, sender=True, federation=dict(FAST, peers={S: proxy_url}))
        nodes = self.fed_instances(proxy.port, ports, p.url)
        p.start()
        self.addCleanup(p.stop)
        for n in nodes:
            n.start()
            self.addCleanup(n.stop)
        # S's instances push to P, P pushes to S (through the proxy: any
        # instance takes it), while instance 1 is killed and PostgreSQL
        # restarts.
        total, step = 120, 10
        for r in range(0, total, step):
            for k, n in enumerate(nodes):
                if n.proc:
                    n.push(P, range((k + 1) * 100000 + r, (k + 1) * 100000 + r + step))
            p.push(S, range(r, r + step))
            time.sleep(0.1)
            if r == 40:  # kill -9 of an instance mid-stream
                victim = nodes[0]
                self.assertTrue(wait_for(lambda: len(victim.read_acks()) >= 30, 30), victim.stderr())
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait()
                victim.proc = None
                victim.log.close()
            if r == 80:  # PostgreSQL restarted under load
                self.pg.restart()
        acked_by = {}
        for k, n in enumerate(nodes):
            if n.proc:
                self.assertTrue(n.wait_acks(total, 60), n.stderr())
            acked_by[k + 1] = {x["id"] for x in n.read_acks() if x.get("how") in ("pushed", "queued")}
        self.assertEqual(len(acked_by[2]), total, nodes[1].read_acks()[-3:])
        self.assertGreaterEqual(len(acked_by[1]), 30)
        self.assertTrue(wait_for(lambda: all(a <= set(p.received_ids()) for a in acked_by.values()), 90),
                        "P lacks %r\n%s" % ([sorted(a - set(p.received_ids()))[:5] for a in acked_by.values()],
                                             p.stderr() + self.pg_rows("SELECT server_id, last_error, last_push, last_push_in, last_pull, last_served FROM peers") + self.pg_rows("SELECT * FROM leases") + self.pg_rows("SELECT count(*) FROM outbox")))
        self.check_stream(p.received_ids(), acked_by, "S -> P")
        # P's events, acknowledged by whichever instance took the Push, are
        # delivered to S's handlers (one instance at a time per peer): in
        # order overall, each at least once.
        self.assertTrue(p.wait_acks(total, 60), p.stderr())
        p_acked = {x["id"] for x in p.read_acks() if x.get("how") in ("pushed", "queued")}
        self.assertEqual(len(p_acked), total)

        def delivered():  # in the order the handlers ran, whichever instance
            return nodes[0].received_ids()
        self.assertTrue(wait_for(lambda: p_acked <= set(delivered()), 90),
                        "S lacks %r" % sorted(p_acked - set(delivered()))[:10])
        self.check_stream(delivered(), {0: p_acked}, "P -> S")
        # Nothing left behind in PostgreSQL: the queue to P is drained and
        # every inbox row was delivered.
        self.assertTrue(wait_for(lambda: self.pg_count("outbox") == 0 and self.pg_count("inbox") == 0, 60),
                        "outbox %s inbox %s" % (self.pg_count("outbox"), self.pg_count("inbox")))
        # `segue status` on any instance: the peer's row from the shared store.
        r = run(["status", nodes[1].config], timeout=60, cwd=nodes[1].dir)
        self.assertEqual(r.code, 0, r.stderr)
        st = json.loads(r.stdout)
        peer = [x for x in st["peers"] if x["server_id"] == P]
        self.assertEqual(len(peer), 1, st)
        self.assertEqual((peer[0]["queued"], peer[0]["inbox"]), (0, 0))
        self.assertGreater(peer[0].get("last_push_in", 0), 0)

    def pg_rows(self, sql):
        return self.sql(sql)

    def pg_count(self, table):
        return int(self.sql("SELECT count(*) FROM %s" % table) or -1)


if __name__ == "__main__":
    unittest.main()
