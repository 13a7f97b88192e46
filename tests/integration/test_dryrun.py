"""`segue rules test` (issue 18): the message log a real run filled,
replayed through new rules and the running ones without sending anything,
the output checked line by line; its exit codes; --room and --since; and
`rules_check = "dry-run"`, which keeps rules that fail the replay from
being loaded by `segue reload` or by the running segue."""
import json
import os
import re
import time
import unittest

from harness import run, tmpdir, wait_for, write
from test_router import Bridge

RUNNING = 'return { bridge { "a:#x", "b:#x" } }\n'

NEW = r"""return {
  bridge { "a:#x", "b:#x", format = "{sender}: ",
    filter = function(msg, ctx) return not ctx.text:find("secret") end },
  bridge { name = "log", "a:#x", "c:#log",
    rewrite = function(msg, ctx) if ctx.text:find("four") then error("no fours") end return msg end },
}
"""

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


class _ClassScope:
    """What Bridge needs of a test, for setUpClass: cleanups run at tearDownClass."""

    def __init__(self):
        self.cleanups = []

    def addCleanup(self, fn, *a, **kw):
        self.cleanups.append((fn, a, kw))

    def assertTrue(self, v, msg=None):
        assert v, msg

    def assertEqual(self, a, b, msg=None):
        assert a == b, msg


class DryRun(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # a real run fills the store: four messages in a:#x, their copies in b:#x
        cls.scope = _ClassScope()
        cls.d = tmpdir()
        b = Bridge(cls.scope, RUNNING, backends='a = { script = "memory" }, b = { script = "memory" },'
                   ' c = { script = "memory" },', d=cls.d)
        for i, text in enumerate(["one", "two", "a secret three", "four"]):
            b.say("a", "#x", "alice", text)
            assert wait_for(lambda: len(b.texts("b")) == i + 1, 15), b.seen()
        b.stop()
        write(os.path.join(cls.d, "new.lua"), NEW)

    @classmethod
    def tearDownClass(cls):
        for fn, a, kw in cls.scope.cleanups:
            fn(*a, **kw)

    def rules_test(self, *args):
        return run(["rules", "test"] + list(args), cwd=self.d)

    def test_each_message_where_the_running_and_the_new_rules_send_it(self):
        r = self.rules_test("new.lua", "cfg.lua")
        self.assertEqual(r.code, 0, r.stderr)
        lines = r.stdout.splitlines()
        want = [
            TS + r" a:#x <alice> one",
            r"  ~ b:#x alice: one", r"    was <alice@a> one",
            r"  \+ c:#log <alice@a> one",
            TS + r" a:#x <alice> two",
            r"  ~ b:#x alice: two", r"    was <alice@a> two",
            r"  \+ c:#log <alice@a> two",
            TS + r" a:#x <alice> a secret three",
            r"  - b:#x <alice@a> a secret three",
            r"  \+ c:#log <alice@a> a secret three",
            TS + r" a:#x <alice> four",
            r"  ~ b:#x alice: four", r"    was <alice@a> four",
            r"  ! new rules: bridge log: rewrite failed: .*new.lua:5: no fours",
            r"4 message\(s\) since " + TS + r": 0 copies the same, 3 new target\(s\), 1 lost target\(s\), "
            r"3 changed text, 1 filter/rewrite error\(s\) in the new rules \(0 in the running ones\)",
        ]
        self.assertEqual(len(lines), len(want), r.stdout)
        for line, pattern in zip(lines, want):
            self.assertRegex(line, "^" + pattern + "$")

    def test_nothing_is_sent(self):
        before = open(os.path.join(self.d, "seen.jsonl")).read()
        self.rules_test("new.lua", "cfg.lua")
        self.assertEqual(open(os.path.join(self.d, "seen.jsonl")).read(), before)

    def test_the_running_rules_against_themselves_are_all_the_same(self):
        write(os.path.join(self.d, "same.lua"), RUNNING)
        r = self.rules_test("same.lua", "cfg.lua")
        self.assertEqual(r.code, 0, r.stderr)
        self.assertIn("4 message(s) since", r.stdout)
        self.assertIn(": 4 copies the same, 0 new target(s), 0 lost target(s), 0 changed text", r.stdout)

    def test_room_and_since_choose_the_messages(self):
        r = self.rules_test("new.lua", "--room", "b:#x", "cfg.lua")
        self.assertEqual(r.code, 0, r.stderr)
        self.assertTrue(r.stdout.startswith("0 message(s)"), r.stdout)  # b:#x holds only copies
        time.sleep(2.1)
        r = self.rules_test("new.lua", "--since", "1s", "cfg.lua")
        self.assertEqual(r.code, 0, r.stderr)
        self.assertTrue(r.stdout.startswith("0 message(s)"), r.stdout)
        r = self.rules_test("new.lua", "--since", "1h", "--room", "a:#x", "cfg.lua")
        self.assertIn("4 message(s)", r.stdout)

    def test_exit_codes(self):
        write(os.path.join(self.d, "broken.lua"), "return { bridge { \"a:#x\" } }\n")
        r = self.rules_test("broken.lua", "cfg.lua")
        self.assertEqual(r.code, 1)
        self.assertIn("a bridge joins at least two endpoints", r.stderr)
        self.assertEqual(r.stdout, "")
        write(os.path.join(self.d, "failing.lua"),
              'return { bridge { "a:#x", "b:#x" }, test = function(sim) assert(#sim("a:#x", "hi") == 2, "want 2") end }\n')
        r = self.rules_test("failing.lua", "cfg.lua")
        self.assertEqual(r.code, 1)
        self.assertIn("self-test failed", r.stderr)
        r = self.rules_test("new.lua", "--since", "soon", "cfg.lua")
        self.assertEqual(r.code, 2)
        self.assertIn("--since soon", r.stderr)
        self.assertEqual(run(["rules"], cwd=self.d).code, 2)


class RulesCheck(unittest.TestCase):
    def test_reload_requires_a_clean_dry_run(self):
        d = tmpdir()
        b = Bridge(self, RUNNING, backends='a = { script = "memory" }, b = { script = "memory" },'
                   ' c = { script = "memory" },', d=d)
        def rules_status():
            return json.loads(run(["status", "cfg.lua"], cwd=d).stdout)["rules"]
        with open(os.path.join(d, "cfg.lua"), "a") as f:
            f.write('rules_check = "dry-run"\n')
        r = run(["reload", "cfg.lua"], cwd=d)  # the running segue takes rules_check on
        self.assertEqual(r.code, 0, r.stderr)
        self.assertTrue(wait_for(lambda: rules_status()["loads"] == 2, 15), rules_status())
        b.say("a", "#x", "alice", "four")
        self.assertTrue(wait_for(lambda: b.texts("b"), 15))
        write(os.path.join(d, "rules.lua"), NEW)
        r = run(["reload", "cfg.lua"], cwd=d)
        self.assertEqual(r.code, 1, r.stdout + r.stderr)
        self.assertIn("not reloaded", r.stderr)
        self.assertIn("no fours", r.stderr)
        # the running segue saw the file change too, and kept its rules
        self.assertTrue(wait_for(lambda: "dry run" in (rules_status().get("last_error") or ""), 15), rules_status())
        self.assertEqual(rules_status()["loads"], 2)
        b.say("a", "#x", "alice", "still the old format")
        self.assertTrue(wait_for(lambda: "<alice@a> still the old format" in b.texts("b"), 15), b.texts("b"))

        write(os.path.join(d, "rules.lua"), NEW.replace('error("no fours")', 'return nil'))
        r = run(["reload", "cfg.lua"], cwd=d)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertIn("asked segue", r.stdout)
        self.assertTrue(wait_for(lambda: rules_status()["loads"] >= 3, 15), rules_status())
        b.say("a", "#x", "alice", "the new format")
        self.assertTrue(wait_for(lambda: "alice: the new format" in b.texts("b"), 15), b.texts("b"))
        b.stop()


if __name__ == "__main__":
    unittest.main()
