"""Capabilities and graceful degradation (issue 18): backends announce what
their service can do in segue's InitInfo extension (subprocess and Lua
backends), Lua sees it in info().capabilities and a rule's ctx, and each
copy is adapted end to end through a bridge: formatting to plain text with
markers, long messages split at a boundary or cut with a notice,
attachments over the limit as a notice, long edits as a correction notice;
each adaptation counted in `segue status`."""
import json
import os
import unittest

from harness import PYTHON, run, run_lua, tmpdir, wait_for
from test_router import Bridge, CHAT

WORDS = " ".join("word%02d" % i for i in range(30))  # 209 characters

RULES = r"""
return {
  bridge { "chat:#fmt", "tiny:#fmt" },
  bridge { name = "cutter", long = "cut", "chat:#cut", "tiny:#cut" },
  bridge { name = "big", "chat:#big", "big:#big" },
  bridge { name = "aware", "chat:#aware", "tiny:#aware",
    filter = function(msg, ctx) return ctx.capabilities.max_length == 60 end },
}
"""

TINY = """{ formatting = { "Text" }, max_length = 60,
            attachments = { max_bytes = 10, types = { "image/*" } } }"""


def backends(chat_file, caps=None):
    env = ""
    if caps is not None:
        env = ", env = { CHAT_CAPABILITIES = %s }" % json.dumps(json.dumps(caps))
    return """
        chat = { cmd = %s, args = { %s, %s }%s },
        tiny = { script = "memory", options = { capabilities = %s } },
        big = { script = "memory", options = { capabilities = { max_length = 0 } } },
    """ % (json.dumps(PYTHON), json.dumps(CHAT), json.dumps(chat_file), env, TINY)


def counters(d):
    r = run(["status", "cfg.lua"], cwd=d)
    assert r.code == 0, r.stderr
    return json.loads(r.stdout).get("counters", {})


def counter(d, kind, name, key):
    return counters(d).get(kind, {}).get(name, {}).get(key)


class Degrade(unittest.TestCase):
    def setUp(self):
        self.d = tmpdir()
        self.b = Bridge(self, RULES, backends=backends(os.path.join(self.d, "chat-in.jsonl")), d=self.d)

    def texts(self, backend, room):
        return [s["text"] for s in self.b.seen() if s["backend"] == backend and room in s["room"]]

    def test_formatting_becomes_plain_text_with_markers(self):
        self.b.chat(room="#fmt", sender="alice", content={"type": "Concat", "value": [
            {"type": "Text", "value": "plain "}, {"type": "Bold", "value": {"type": "Text", "value": "loud"}},
            {"type": "Text", "value": " "}, {"type": "Crossout", "value": {"type": "Text", "value": "gone"}},
            {"type": "Text", "value": " "}, {"type": "UrlLink", "value": "https://example.org"}]})
        self.assertTrue(wait_for(lambda: self.texts("tiny", "fmt"), 15), self.b.seen())
        self.assertEqual(self.texts("tiny", "fmt"), ["<alice@chat> plain *loud* ~gone~ https://example.org"])
        self.assertTrue(wait_for(lambda: counter(self.d, "backends", "tiny", "degraded_formatting") == 1, 10),
                        counters(self.d))

    def test_a_long_message_is_split_at_word_boundaries(self):
        self.b.chat(room="#fmt", sender="alice", text=WORDS)
        self.assertTrue(wait_for(lambda: "word29" in "".join(self.texts("tiny", "fmt")), 15), self.b.seen())
        parts = self.texts("tiny", "fmt")
        self.assertGreaterEqual(len(parts), 4)
        for p in parts:
            self.assertLessEqual(len(p), 60, parts)
            self.assertRegex(p, r"(^|\s)word\d\d$", parts)  # never inside a word
        self.assertEqual(" ".join(parts), "<alice@chat> " + WORDS)
        self.assertTrue(wait_for(lambda: counter(self.d, "bridges", "bridge1", "degraded") == 1, 10))
        self.assertEqual(counters(self.d)["bridges"]["bridge1"]["sent"], len(parts))

    def test_a_long_message_is_cut_with_a_notice_when_the_bridge_says_so(self):
        self.b.chat(room="#cut", sender="alice", text=WORDS)
        self.assertTrue(wait_for(lambda: self.texts("tiny", "cut"), 15), self.b.seen())
        [text] = self.texts("tiny", "cut")
        self.assertLessEqual(len(text), 60)
        self.assertTrue(text.startswith("<alice@chat> word00 word01"), text)
        self.assertRegex(text, r" \[…cut: \d+ more characters\]$")

    def test_an_attachment_over_the_limit_becomes_a_notice(self):
        self.b.chat(room="#big", sender="alice", text="small", attach=5)
        self.b.chat(room="#fmt", sender="alice", text="photo", attach=50)
        self.assertTrue(wait_for(lambda: self.texts("tiny", "fmt") and self.texts("big", "big"), 15), self.b.seen())
        # the notice makes the copy longer than tiny's 60 characters: split too
        self.assertTrue(wait_for(lambda: "bytes]" in " ".join(self.texts("tiny", "fmt")), 15), self.b.seen())
        copies = [s for s in self.b.seen() if s["backend"] == "tiny" and "fmt" in s["room"]]
        self.assertEqual(sum(c["attachments"] for c in copies), 0)
        self.assertIn("[attachment image/png of 50 bytes not bridged to tiny: over its limit of 10 bytes]",
                      " ".join(c["text"] for c in copies))
        [kept] = [s for s in self.b.seen() if s["backend"] == "big"]
        self.assertEqual(kept["attachments"], 1)
        self.assertTrue(wait_for(lambda: counter(self.d, "backends", "tiny", "degraded_attachment") == 1, 10))

    def test_a_long_edit_becomes_a_short_correction_notice(self):
        long_text = "x" * 20 + " " + WORDS
        self.b.chat(room="#big", sender="alice", text=long_text)
        self.assertTrue(wait_for(lambda: self.texts("big", "big"), 15), self.b.seen())
        origin = [s for s in self.b.seen() if s["backend"] == "chat" and s["room"] == "#big"][0]
        self.b.chat(edit=origin["id"], text=long_text + " and more")
        self.assertTrue(wait_for(lambda: len(self.texts("big", "big")) == 2, 15), self.b.seen())
        edit = self.texts("big", "big")[1]
        self.assertTrue(edit.startswith("(edited) <alice@chat> xxxx"), edit)
        self.assertIn("[a message was edited", edit)
        self.assertLess(len(edit), 200)
        self.assertTrue(wait_for(lambda: counter(self.d, "backends", "big", "degraded_edit") == 1, 10))

    def test_a_rule_sees_the_destination_capabilities(self):
        self.b.chat(room="#aware", sender="alice", text="seen by a filter that reads ctx.capabilities")
        self.assertTrue(wait_for(lambda: self.texts("tiny", "aware"), 15), self.b.seen())


class Capabilities(unittest.TestCase):
    def test_lua_and_subprocess_backends_announce_and_others_get_defaults(self):
        chat_file = os.path.join(tmpdir(), "chat-in.jsonl")
        r = run_lua("""
            assert(segue.add_backend("mem", { script = "memory" }))
            assert(segue.add_backend("tiny", { script = "memory", options = { capabilities = %s } }))
            assert(segue.add_backend("chat", { cmd = %s, args = { %s, %s },
              env = { CHAT_CAPABILITIES = '{"edits": true, "max_length": 500, "length_unit": "bytes"}' } }))
            assert(segue.add_backend("plain", { cmd = %s, args = { %s, %s } }))
            segue.await(function()
              for _, n in ipairs { "mem", "tiny", "chat", "plain" } do
                while (segue.backend(n):info() or {}).state ~= "running" do segue.sleep(20) end
              end
            end, 20000)
            local out_t = {}
            for _, n in ipairs { "mem", "tiny", "chat", "plain" } do out_t[n] = segue.backend(n):info().capabilities end
            out(out_t)
        """ % (TINY, json.dumps(PYTHON), json.dumps(CHAT), json.dumps(chat_file),
               json.dumps(PYTHON), json.dumps(CHAT), json.dumps(chat_file + "2")))
        self.assertEqual(r.code, 0, r.stderr)
        caps = r.values()[-1]
        self.assertIn("Bold", caps["mem"]["formatting"])
        self.assertTrue(caps["mem"]["history"])
        self.assertNotIn("max_length", caps["mem"])  # 0: no limit
        self.assertEqual(caps["tiny"]["max_length"], 60)
        self.assertEqual(caps["tiny"]["attachments"], {"max_bytes": 10, "types": ["image/*"]})
        self.assertTrue(caps["chat"]["edits"])
        self.assertEqual(caps["chat"]["max_length"], 500)
        self.assertEqual(caps["chat"]["length_unit"], "bytes")
        self.assertEqual(caps["chat"]["formatting"], ["Text"])  # not announced: the default
        self.assertEqual(caps["plain"], {"edits": False, "deletes": False, "replies": False, "reactions": False,
                                         "history": False, "formatting": ["Text"], "max_length": 4000,
                                         "length_unit": "chars",
                                         "attachments": {"max_bytes": 1048576, "types": ["*/*"]}})

    def test_built_in_backends_declare_theirs(self):
        r = run_lua("""
            local d = tmp_notes
            assert(segue.add_backend("irc", { script = "irc", options = { host = "127.0.0.1", port = 1 } }))
            assert(segue.add_backend("notes", { script = "notes", options = { dir = arg[1] } }))
            segue.wait(300)
            out { irc = segue.backend("irc"):info().capabilities, notes = segue.backend("notes"):info().capabilities }
        """, args=[os.path.join(tmpdir(), "notes")])
        self.assertEqual(r.code, 0, r.stderr)
        caps = r.values()[-1]
        self.assertEqual(caps["irc"]["attachments"]["max_bytes"], 0)
        self.assertEqual(caps["irc"]["length_unit"], "bytes")
        self.assertIn("Bold", caps["irc"]["formatting"])
        self.assertNotIn("UrlLink", caps["irc"]["formatting"])
        self.assertTrue(caps["notes"]["history"])


if __name__ == "__main__":
    unittest.main()
