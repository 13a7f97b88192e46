"""Several segue instances on one PostgreSQL (docs/scaling.md), against a
real PostgreSQL 15 started here (pg_server.py): three instances share two
subprocess backends, which run on exactly one instance (the holder of the
lease "backends": all together, so copies between them stay in one process),
`segue status` shows every instance and what it owns, `kill -9` of the
instance owning a backend hands it to another within the lease time, and
`segue migrate` applies the schema."""
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
from harness import SEGUE, FAKE, PYTHON, run, tmpdir, write, wait_for

# An instance stops its backends when it could not renew for 80% of the
# lease (renewals every lease_ms / 3); 1 s let a loaded machine under ASan
# stall a renewal that long, so the lease moved and backend a started twice
# before the kill. 4 s keeps the takeover well inside the bounds below.
LEASE_MS = 4000


def running_backends(marker):
    """Live processes whose command line holds `marker` (a backend's state
    file): how many copies of that backend run right now."""
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open("/proc/%s/stat" % pid) as f:
                if f.read().split(") ")[-1].startswith("Z"):
                    continue
        except OSError:
            continue
        if marker in cmd:
            n += 1
    return n


@unittest.skipUnless(pg_server.available(), pg_server.MISSING)
class Scaling(unittest.TestCase):
    def setUp(self):
        self.pg = pg_server.PgServer()
        self.addCleanup(self.pg.cleanup)
        self.pg.start()
        self.pg.psql("CREATE DATABASE segue")
        self.dsn = self.pg.dsn.replace("dbname=postgres", "dbname=segue")
        self.dir = tmpdir()
        self.addCleanup(shutil.rmtree, self.dir, True)
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
        each), bridged a:#s -> b:#s by the rules."""
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
  b = { cmd = %s, args = { %s, "--out=%s", "--state=%s" } },
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
        self.assertIn("postgresql: schema at version 3", r.stdout)
        self.assertEqual(subprocess.run(["psql", "-X", "-A", "-t", "-d", self.dsn, "-c",
                                         "SELECT version FROM segue_schema"],
                                        stdout=subprocess.PIPE, timeout=60).stdout.decode().strip(), "3")
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


    def bridged(self):
        """The origin ids of the copies b received, in order."""
        if not os.path.exists(self.b_out):
            return []
        with open(self.b_out) as f:
            return [json.loads(l)["origin"]["id"] for l in f if l.endswith("\n")]

    def test_a_stream_survives_kill_9_of_the_owner_nothing_lost_in_order(self):
        self.a_in = os.path.join(self.dir, "a.in")
        self.b_out = os.path.join(self.dir, "b.out")
        for name in ("i1", "i2", "i3"):
            self.start(name, stream=True)
        self.assertTrue(wait_for(self.all_running, 60), self.log("i1") + self.log("i2"))
        owner = self.owners()["a"][0]
        n = 200
        ids = ["m%03d" % i for i in range(n)]

        def say():  # the chat service's users, one message every 10 ms
            for i, mid in enumerate(ids):
                with open(self.a_in, "a") as f:
                    f.write(json.dumps({"id": mid, "text": "hello %d" % i, "t": 1000 + i}) + "\n")
                time.sleep(0.01)
        writer = threading.Thread(target=say)
        writer.start()
        # kill -9 of the owner mid-stream, once some copies went out, at a
        # point that varies from run to run.
        self.assertTrue(wait_for(lambda: len(self.bridged()) >= 40, 30), self.log(owner))
        time.sleep(random.random() * 0.05)
        p, _ = self.procs[owner]
        p.send_signal(signal.SIGKILL)
        p.wait()
        before = self.bridged()
        writer.join()
        self.assertTrue(wait_for(lambda: self.all_running(exclude=(owner,)), 30),
                        "\n".join(self.log(x) for x in self.procs))
        # The new owner's backend a replays the whole history: what was
        # bridged is recognised (the message map is in PostgreSQL), the rest
        # is bridged now.
        self.assertTrue(wait_for(lambda: set(self.bridged()) >= set(ids), 60),
                        "missing %r\n%s" % (sorted(set(ids) - set(self.bridged()))[:10],
                                             "\n".join(self.log(x) for x in self.procs)))
        time.sleep(2)  # a replay bridged twice would show by now
        got = self.bridged()
        self.assertEqual(got[:len(before)], before)
        # Bridged twice: only copies in flight when the owner died (sent,
        # their ids not yet recorded in PostgreSQL) may go out again, once
        # more; docs/scaling.md says why. Nothing said after the kill twice.
        twice = sorted({x for x in got if got.count(x) > 1})
        for x in twice:
            self.assertIn(x, before, "bridged twice after the kill: %s" % x)
            self.assertEqual(got.count(x), 2, x)
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


if __name__ == "__main__":
    unittest.main()
