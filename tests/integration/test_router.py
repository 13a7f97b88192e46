"""The router through the real binary: bridges between in-process and
subprocess backends, one-way endpoints, filters and rewrites, echo
suppression, edits and deletes, contained rule errors, restarts keeping the
id map, and reloads under a steady message stream."""
import json
import os
import signal
import subprocess
import time
import unittest

from harness import SEGUE, PYTHON, HERE, inject_lua, say, tmpdir, write, run, wait_for

CHAT = os.path.join(HERE, "router_chat_backend.py")

# observe.lua: every MessageUpsert as a JSON line (seen.jsonl); inject.lua
# (harness.inject_lua) says what say() appends to inject.jsonl.
OBSERVE = r"""
local segue = require "segue"
local out = assert(io.open("seen.jsonl", "a"))
out:setvbuf("line")
segue.on("update", function(name, u)
  if u.type == "MessageUpsert" then
    out:write(segue.json.encode { backend = name, id = u.value.id, sender = u.value.sender,
      room = u.value.recipient, text = require("segue.router").plain(u.value.content),
      attachments = #u.value.attachments, extra = u.value.extra }, "\n")
  end
end)
segue.every(20, function()
  if require("segue.router").ready() then
    local r = io.open("ready", "w") r:write("1") r:close()
  end
end)
"""


class Bridge:
    """A running `segue run` with a config, rules and the observer."""

    def __init__(self, test, rules, backends=None, d=None):
        self.d = d or tmpdir()
        self.test = test
        self.chat_file = os.path.join(self.d, "chat-in.jsonl")
        write(os.path.join(self.d, "observe.lua"), OBSERVE)
        write(os.path.join(self.d, "inject.lua"), inject_lua())
        write(os.path.join(self.d, "rules.lua"), rules)
        backends = backends or """
            a = { script = "memory" }, b = { script = "memory" },
            chat = { cmd = %s, args = { %s, %s } },
        """ % (json.dumps(PYTHON), json.dumps(CHAT), json.dumps(self.chat_file))
        write(os.path.join(self.d, "cfg.lua"), "backends = { %s }\nrules = \"rules.lua\"\nscripts = { \"observe.lua\", \"inject.lua\" }\n" % backends)
        self.start()

    def start(self):
        self.p = subprocess.Popen([SEGUE, "run", "cfg.lua"], cwd=self.d, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.test.addCleanup(lambda: self.p.poll() is None and self.p.kill())
        ready = os.path.join(self.d, "ready")
        if os.path.exists(ready):
            os.remove(ready)
        # backends start, rooms resolve and are joined
        self.test.assertTrue(wait_for(lambda: os.path.exists(ready), 30), "the router never got ready")

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        out, err = self.p.communicate(timeout=20)
        self.test.assertEqual(self.p.returncode, 0, err)
        return err

    def say(self, backend, room, sender, text):
        say(self.d, backend, room, sender, text)

    def chat(self, **cmd):
        with open(self.chat_file, "a") as f:
            f.write(json.dumps(cmd) + "\n")

    def seen(self):
        try:
            with open(os.path.join(self.d, "seen.jsonl")) as f:
                return [json.loads(x) for x in f if x.strip()]
        except FileNotFoundError:
            return []

    def texts(self, backend):
        return [s["text"] for s in self.seen() if s["backend"] == backend]

    def wait_for(self, pred, timeout=10):
        return wait_for(pred, timeout)


class Routing(unittest.TestCase):
    def test_a_two_way_bridge_across_three_backends_without_echoes(self):
        br = Bridge(self, 'return { bridge { "a:#general", "b:#general", "chat:#main" } }')
        br.say("a", "#general", "alice", "hello")
        br.chat(room="#main", sender="carol", text="hi from chat")
        self.assertTrue(br.wait_for(lambda: "<carol@chat> hi from chat" in br.texts("b")))
        time.sleep(0.5)  # give any echo loop time to show itself
        # the two sources are independent: compare without their interleaving
        self.assertEqual(sorted(br.texts("a")), ["<carol@chat> hi from chat", "hello"])
        self.assertEqual(sorted(br.texts("b")), ["<alice@a> hello", "<carol@chat> hi from chat"])
        self.assertEqual(sorted(br.texts("chat")), ["<alice@a> hello", "hi from chat"])
        br.stop()

    def test_one_way_endpoints_and_formats(self):
        br = Bridge(self, '''return {
            bridge { "a:#x", { "b:#log", mode = "out", format = "[{backend}/{room}] {sender}: " } },
            bridge { { "chat:#ann", mode = "in" }, "a:#x" },
        }''')
        br.say("a", "#x", "alice", "one")
        br.say("b", "#log", "bob", "not bridged back")
        br.chat(room="#ann", sender="ops", text="announcement")
        self.assertTrue(br.wait_for(lambda: "<ops@chat> announcement" in br.texts("a")))
        time.sleep(0.3)
        self.assertEqual(br.texts("b"), ["[a/#x] alice: one", "not bridged back"])
        self.assertEqual(br.texts("chat"), ["announcement"])  # in-only: nothing goes to chat
        br.stop()

    def test_filters_rewrites_and_contained_rule_errors(self):
        br = Bridge(self, '''return {
            bridge { "a:#f", "b:#f",
              filter = function(msg, ctx) return not ctx.text:find("secret") end,
              rewrite = function(msg, ctx)
                if ctx.text == "boom" then error("rewrite blew up") end
                if ctx.text == "spin" then while true do end end
                msg.content = { type = "Text", value = ctx.text:upper() }
                return msg
              end },
        }''')
        for t in ("visible", "a secret", "boom", "spin", "after"):
            br.say("a", "#f", "alice", t)
        self.assertTrue(br.wait_for(lambda: "<alice@a> AFTER" in br.texts("b")))
        self.assertEqual(br.texts("b"), ["<alice@a> VISIBLE", "<alice@a> AFTER"])
        err = br.stop()
        self.assertIn("rewrite failed", err)
        self.assertIn("rewrite blew up", err)
        self.assertIn("rule stopped after 1000000 instructions", err)

    def test_edits_are_resent_marked_and_deletes_announced(self):
        br = Bridge(self, '''return {
            bridge { "chat:#e", "a:#e", deletes = "notice" },
            bridge { "chat:#i", "b:#i", edits = "ignore" },
        }''')
        br.chat(room="#e", sender="carol", text="first")
        br.chat(room="#i", sender="carol", text="other")
        self.assertTrue(br.wait_for(lambda: br.texts("a") and br.texts("b")))
        origin = [s for s in br.seen() if s["backend"] == "chat" and s["text"] == "first"][0]["id"]
        other = [s for s in br.seen() if s["backend"] == "chat" and s["text"] == "other"][0]["id"]
        br.chat(edit=origin, text="first, fixed")
        br.chat(edit=other, text="other, fixed")
        self.assertTrue(br.wait_for(lambda: "(edited) <carol@chat> first, fixed" in br.texts("a")))
        br.chat(delete=origin)
        self.assertTrue(br.wait_for(lambda: "(a bridged message was deleted)" in br.texts("a")))
        time.sleep(0.3)
        self.assertEqual(br.texts("b"), ["<carol@chat> other"])
        br.stop()


    def test_attachments_pass_within_the_limit_and_become_a_notice_over_it(self):
        br = Bridge(self, 'return { bridge { "chat:#att", "a:#att", max_attachment_bytes = 100 } }')
        br.chat(room="#att", sender="carol", text="small", attach=60)
        br.chat(room="#att", sender="carol", text="big", attach=500)
        self.assertTrue(br.wait_for(lambda: len(br.texts("a")) == 2))
        copies = [s for s in br.seen() if s["backend"] == "a"]
        self.assertEqual([c["attachments"] for c in copies], [1, 0])
        self.assertEqual(copies[1]["text"],
                         "<carol@chat> big [attachment image/png of 500 bytes not bridged: over the limit of 100]")
        self.assertEqual(copies[0]["extra"]["segue_origin"]["backend"], "chat")
        br.stop()


    def test_two_segue_instances_bridging_the_same_rooms_make_no_loop(self):
        # Two chat services shared by two segue instances (each runs its own
        # process of each service; the processes share each room through a
        # log file). Both instances bridge the same two rooms.
        d = tmpdir()
        shared = [os.path.join(d, "room1.log"), os.path.join(d, "room2.log")]
        instances = []
        for i in range(2):
            sub = os.path.join(d, "i%d" % i)
            os.makedirs(sub)
            backends = ", ".join('chat%d = { cmd = %s, args = { %s, %s, %s } }' % (
                n + 1, json.dumps(PYTHON), json.dumps(CHAT), json.dumps(os.path.join(sub, "in%d" % n)),
                json.dumps(shared[n])) for n in range(2))
            instances.append(Bridge(self, 'return { bridge { "chat1:#x", "chat2:#x" } }', backends=backends, d=sub))
        with open(os.path.join(instances[0].d, "in0"), "a") as f:
            f.write(json.dumps({"room": "#x", "sender": "carol", "text": "once"}) + "\n")

        def lines(path):
            with open(path) as f:
                return [json.loads(x)["m"]["content"] for x in f if x.strip()]
        self.assertTrue(wait_for(lambda: len(lines(shared[1])) >= 2))
        time.sleep(1.5)  # a loop would keep both logs growing
        self.assertEqual(len(lines(shared[0])), 1, "room 1 keeps growing: a loop")
        self.assertEqual(len(lines(shared[1])), 2, "room 2: one copy per instance, no more")
        for br in instances:
            br.stop()


class Lifecycle(unittest.TestCase):
    def test_a_restart_keeps_the_id_map(self):
        br = Bridge(self, 'return { bridge { "chat:#r", "a:#r" } }')
        br.chat(room="#r", sender="carol", text="before restart")
        self.assertTrue(br.wait_for(lambda: br.texts("a")))
        origin = [s for s in br.seen() if s["backend"] == "chat"][0]["id"]
        br.stop()
        self.assertTrue(os.path.exists(os.path.join(br.d, "segue-data", "segue.db")))
        br.start()
        # An edit of the message bridged before the restart: recognised as
        # an edit (from the stored id map), not as a new message.
        br.chat(edit=origin, text="edited after restart")
        self.assertTrue(br.wait_for(lambda: "(edited) <carol@chat> edited after restart" in br.texts("a")))
        self.assertNotIn("<carol@chat> edited after restart", br.texts("a"))
        br.stop()

    def test_broken_rules_keep_the_old_ones_and_reloads_lose_nothing(self):
        good = 'return { bridge { "a:#s", "b:#s" }, test = function(sim) assert(#sim("a:#s", "x") == 1) end }\n'
        broken = [
            'return { bridge { "a:#s", "nobody:#s" } }\n',
            'return { bridge { "a:#s" } }\n',
            'return { bridge { "a:#s", "b:#s" }, test = function(sim) assert(#sim("a:#s", "x") == 2, "self-test says no") end }\n',
            'return {{{ syntax\n',
            'while true do end\n',
        ]
        br = Bridge(self, good)
        rules = os.path.join(br.d, "rules.lua")
        sent = 0
        for i in range(100):
            write(rules, good if i % 2 else broken[(i // 2) % len(broken)] + "-- %d\n" % i)
            if i % 3 == 0:
                br.p.send_signal(signal.SIGHUP)
            else:
                subprocess.run([SEGUE, "reload", "cfg.lua"], cwd=br.d, capture_output=True, timeout=10)
            br.say("a", "#s", "alice", "m%d" % sent)
            sent += 1
            time.sleep(0.05)
        expect = ["<alice@a> m%d" % i for i in range(sent)]
        self.assertTrue(br.wait_for(lambda: len(br.texts("b")) >= sent, timeout=30), br.texts("b")[-3:])
        time.sleep(0.5)
        self.assertEqual(br.texts("b"), expect)  # in order, none lost, none twice

        # `segue status` shows the last failed load, and the running rules.
        write(rules, broken[0])
        br.p.send_signal(signal.SIGHUP)

        def status():
            r = run(["status", "cfg.lua"], cwd=br.d)
            return r.values()[0].get("rules", {}) if r.code == 0 and r.values() else {}
        self.assertTrue(br.wait_for(lambda: "no backend named nobody" in (status().get("last_error") or "")))
        # triggers close together coalesce (the watcher debounces), so fewer
        # loads than triggers; broken and good versions both loaded
        self.assertGreaterEqual(status()["failures"], 2)
        self.assertGreaterEqual(status()["loads"], 2)
        err = br.stop()
        self.assertIn("no backend named nobody", err)
        self.assertIn("self-test failed", err)
        self.assertIn("rule stopped after", err)
        self.assertIn("rules reloaded", err)

    def test_check_validates_the_rules(self):
        d = tmpdir()
        write(os.path.join(d, "rules.lua"), 'return { bridge { "a:#s", "ghost:#s" } }\n')
        write(os.path.join(d, "cfg.lua"), 'backends = { a = { script = "memory" } }\nrules = "rules.lua"\n')
        r = run(["check", "cfg.lua"], cwd=d)
        self.assertEqual(r.code, 1)
        self.assertRegex(r.stderr, r"rules\.lua:1: endpoint ghost:#s: no backend named ghost")


if __name__ == "__main__":
    unittest.main()
