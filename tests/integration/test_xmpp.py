"""The XMPP backend against a real XMPP server (Debian's Prosody on loopback
ports, TLS with a certificate made here) and a second real client
(slixmpp): a MUC room bridged with the memory backend and with an IRC
channel (ngircd); messages both ways with formatting; corrections and
retractions; MAM history; 1:1 chats; own echoes; stream management;
reconnecting after Prosody restarts, session resumption and pings. (Login
and connection: test_xmpp_login.py.)"""
import json
import os
import shutil
import unittest

from harness import tmpdir, write
from irc_server import NgIRCd, RawClient
from test_irc import Segue, lua
from xmpp_server import Client, Prosody, Proxy, available, slixmpp_python

ROOM = "test@conference.localhost"
SOURCE = os.environ.get("SEGUE_SOURCE_DIR") or os.path.join(os.path.dirname(__file__), "..", "..")
PY = slixmpp_python()

# Prints every update as a JSON line and obeys commands appended to the file
# CMDS (one JSON value a line): {"mem": content} sends to the memory room,
# {"xmpp": request body} makes a request of the xmpp backend.
WATCH = r"""
local segue = require "segue"
local json = require "segue.json"
local function out(v) io.stdout:write(json.encode(v), "\n") io.stdout:flush() end
segue.on("update", function(name, u) out { from = name, u = u } end)
local done = 0
segue.every(100, function()
  local f = io.open(CMDS)
  if not f then return end
  local n = 0
  for line in f:lines() do
    n = n + 1
    if n > done then
      done = n
      local cmd = json.decode(line)
      segue.spawn(function()
        if cmd.mem then
          local mem = segue.backend("mem")
          local room = mem:request { type = "RoomLookup", value = "#bridge" }.value
          out { mem_sent = mem:request { type = "MessageSend", value = { recipient = room, content = cmd.mem } } }
        else
          local r, err = segue.backend("xmpp"):request(cmd.xmpp)
          out { answer = r, err = err, tag = cmd.tag }
        end
      end)
    end
  end
  f:close()
end)
"""


def contains(tree, node):
    """Whether the content tree holds `node` somewhere."""
    if tree == node:
        return True
    if isinstance(tree, dict):
        return contains(tree.get("value"), node)
    if isinstance(tree, list):
        return any(contains(t, node) for t in tree)
    return False


@unittest.skipUnless(available(), "prosody is not installed (Debian package prosody)")
@unittest.skipUnless(PY, "slixmpp is not installed (Debian package python3-slixmpp)")
class XmppBridge(unittest.TestCase):
    def setUp(self):
        self.server = Prosody({"bridge": "bridge-secret", "bob": "bob-secret"}).start()
        self.addCleanup(self.server.close)
        self.dir = tmpdir()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.cmds = os.path.join(self.dir, "cmds")
        self.sent = 0

    def bob(self):
        c = Client(PY, self.server, "bob@localhost", "bob-secret", ROOM, "bob")
        self.addCleanup(c.close)
        c.wait(lambda e: e.get("joined") == ROOM, what="bob's join")
        return c

    def options(self, **kw):
        opts = {"jid": "bridge@localhost", "password": "bridge-secret", "host": "127.0.0.1",
                "port": self.server.port, "ca_file": self.server.cert, "nick": "bridge",
                "reconnect_ms": 200, "timeout_ms": 10000}
        opts.update(kw)
        return opts

    def segue(self, rules, extra_backends="", **options):
        write(os.path.join(self.dir, "watch.lua"), "CMDS = %s\n%s" % (lua(self.cmds), WATCH))
        write(os.path.join(self.dir, "rules.lua"), "return { %s }" % rules)
        cfg = write(os.path.join(self.dir, "segue.lua"), """
            data_dir = "data"
            backends = {
              xmpp = { script = "xmpp", options = %s },
              mem = { script = "memory" },
              %s
            }
            rules = "rules.lua"
            scripts = { "watch.lua" }
        """ % (lua(self.options(**options)), extra_backends))
        s = Segue(["run", cfg], self.dir)
        self.addCleanup(s.stop)
        s.value(lambda v: v.get("from") == "xmpp" and v["u"]["type"] == "RoomUpsert", 30, "the xmpp join")
        return s

    def command(self, **cmd):
        with open(self.cmds, "a") as f:
            f.write(json.dumps(cmd) + "\n")

    @staticmethod
    def upsert(v, backend, needle):
        return (v.get("from") == backend and v["u"]["type"] == "MessageUpsert"
                and needle in json.dumps(v["u"]["value"]["content"]))

    def test_a_room_bridged_with_memory_carries_formatting_edits_retractions_and_history(self):
        bob = self.bob()
        bob.command(say="said before the bridge came", id="b0")
        bob.wait(lambda e: e.get("id") == "b0" and e.get("stanza_id"), what="b0's reflection")
        s = self.segue('bridge { "xmpp:%s", "mem:#bridge", deletes = "notice" }' % ROOM)

        # XMPP -> memory: styling becomes content nodes.
        bob.command(say="hello *bold* and _slanted_ ~gone~ https://example.org/x", id="b1")
        b1 = bob.wait(lambda e: e.get("id") == "b1" and e.get("stanza_id"), what="b1's reflection")
        got = s.value(lambda v: self.upsert(v, "mem", "slanted"), what="b1 in memory")
        content = got["u"]["value"]["content"]
        for node in ({"type": "Bold", "value": {"type": "Text", "value": "bold"}},
                     {"type": "Italic", "value": {"type": "Text", "value": "slanted"}},
                     {"type": "Crossout", "value": {"type": "Text", "value": "gone"}},
                     {"type": "UrlLink", "value": "https://example.org/x"},
                     {"type": "Text", "value": "<bob@xmpp> "}):
            self.assertTrue(contains(content, node), (node, content))
        xmpp_b1 = s.value(lambda v: self.upsert(v, "xmpp", "slanted"), what="b1 from xmpp")["u"]["value"]
        self.assertEqual(xmpp_b1["id"], ROOM + "#" + b1["stanza_id"])  # the room's stable id (XEP-0359)
        self.assertEqual(xmpp_b1["sender"], "bob")
        self.assertEqual(xmpp_b1["recipient"], ROOM)

        # memory -> XMPP: content nodes become styling.
        self.command(mem={"type": "Concat", "value": [{"type": "Text", "value": "from "},
                                                       {"type": "Bold", "value": {"type": "Text", "value": "memory"}},
                                                       {"type": "Text", "value": " & <friends>"}]})
        m = bob.wait(lambda e: e.get("from") == ROOM + "/bridge", what="memory's message in the room")
        self.assertEqual(m["body"], "<segue@mem> from *memory* & <friends>")
        # Our own message came back from the room: not announced again. (Bob's
        # next message arrives after that reflection, so by then it was seen.)
        bob.command(say="after the echo", id="b2")
        s.value(lambda v: self.upsert(v, "mem", "after the echo"), what="b2 in memory")
        self.assertFalse([v for v in s.values() if self.upsert(v, "xmpp", "from *memory*")
                          or self.upsert(v, "xmpp", '"memory"')], "our own echo was announced")

        # A correction (XEP-0308) is an edit: same id, later edit time; the bridge resends it.
        bob.command(correct="b1", say="hello *bolder*")
        edit = s.value(lambda v: self.upsert(v, "xmpp", "bolder"), what="the correction")["u"]["value"]
        self.assertEqual(edit["id"], xmpp_b1["id"])
        self.assertGreater(edit["edit_time"], edit["create_time"])
        s.value(lambda v: self.upsert(v, "mem", "(edited) ") and self.upsert(v, "mem", "bolder"),
                what="the edit in memory")

        # A retraction (XEP-0424) is a delete; the bridge announces it.
        bob.command(retract=b1["stanza_id"])
        s.value(lambda v: v.get("from") == "xmpp" and v["u"] == {"type": "MessageDelete", "value": xmpp_b1["id"]},
                what="the retraction")
        s.value(lambda v: self.upsert(v, "mem", "was deleted"), what="the delete notice in memory")

        # History (MAM): what was said before segue joined.
        self.command(xmpp={"type": "MessageGetBefore", "value": xmpp_b1["id"]}, tag="history")
        answer = s.value(lambda v: v.get("tag") == "history", what="the history answer")
        self.assertEqual(answer["answer"], {"type": "Success"}, answer)
        old = s.value(lambda v: self.upsert(v, "xmpp", "said before the bridge came"), what="b0 from the archive")
        self.assertEqual(old["u"]["value"]["sender"], "bob")
        self.assertLess(old["u"]["value"]["create_time"], xmpp_b1["create_time"] + 1)

    def test_our_edits_and_retractions_reach_xmpp_clients_and_1_to_1_chats_work(self):
        bob = self.bob()
        s = self.segue('bridge { "xmpp:%s", "mem:#bridge" }' % ROOM)
        origin = {"segue_origin": {"backend": "mem", "id": "m1"}}
        text = lambda t: {"type": "Text", "value": t}
        self.command(xmpp={"type": "MessageSend", "value": {"recipient": ROOM, "content": text("first try"),
                                                            "attachments": [], "extra": origin}}, tag="first")
        first = bob.wait(lambda e: e.get("body") == "first try", what="the first message")
        sent = s.value(lambda v: v.get("tag") == "first", what="the first answer")["answer"]
        self.assertEqual(sent["value"], ROOM + "#" + first["stanza_id"])
        # The same origin again is an edit: a correction of our first message.
        self.command(xmpp={"type": "MessageSend", "value": {"recipient": ROOM, "content": text("second try"),
                                                            "attachments": [], "extra": origin}}, tag="again")
        again = bob.wait(lambda e: e.get("body") == "second try", what="the correction")
        self.assertEqual(again["replace"], first["id"])
        self.assertEqual(s.value(lambda v: v.get("tag") == "again", what="answer")["answer"]["value"], sent["value"])
        self.command(xmpp={"type": "MessageSend", "value": {"recipient": ROOM, "content": text(""),
                                                            "attachments": [], "extra": {"retract": sent["value"]}}})
        gone = bob.wait(lambda e: e.get("retract"), what="the retraction")
        self.assertEqual(gone["retract"], first["stanza_id"])

        # An out-of-band URL (XEP-0066) becomes a link.
        bob.command(say="look at this", oob="https://files.example.org/cat.png")
        oob = s.value(lambda v: self.upsert(v, "xmpp", "look at this"), what="the OOB message")["u"]["value"]
        self.assertTrue(contains(oob["content"], {"type": "UrlLink", "value": "https://files.example.org/cat.png"}), oob)
        self.assertEqual(oob["extra"]["oob"], ["https://files.example.org/cat.png"])

        # 1:1: bob writes to the bridge's JID; the bridge writes back.
        bob.command(chat="bridge@localhost", say="psst *secret*")
        dm = s.value(lambda v: self.upsert(v, "xmpp", "secret"), what="the 1:1 message")["u"]["value"]
        self.assertEqual(dm["sender"], "bob@localhost")
        self.assertEqual(dm["recipient"], "bridge@localhost")
        self.assertIn({"type": "Bold", "value": {"type": "Text", "value": "secret"}}, dm["content"]["value"])
        # History of a 1:1 chat comes from our own archive (MAM), with that peer only.
        self.assertTrue(dm["id"].startswith("bridge@localhost#"), dm["id"])
        bob.command(chat="bridge@localhost", say="psst again")
        dm2 = s.value(lambda v: self.upsert(v, "xmpp", "psst again"), what="the second 1:1 message")["u"]["value"]
        self.command(xmpp={"type": "MessageGetBefore", "value": dm2["id"]}, tag="dm history")
        self.assertEqual(s.value(lambda v: v.get("tag") == "dm history", what="the answer")["answer"],
                         {"type": "Success"})
        s.wait_for(lambda: len([v for v in s.values() if self.upsert(v, "xmpp", "psst *secret*")
                                or self.upsert(v, "xmpp", '"secret"')]) >= 2, 20, "the archived 1:1 message")
        replay = [v["u"]["value"] for v in s.values() if self.upsert(v, "xmpp", '"secret"')][-1]
        self.assertEqual(replay["id"], dm["id"])
        self.assertEqual(replay["sender"], "bob@localhost")

        self.command(xmpp={"type": "MessageSend", "value": {"recipient": "bob@localhost", "content": text("psst back"),
                                                            "attachments": [{"mime": "image/png", "data": "AAAA"}]}})
        back = bob.wait(lambda e: e.get("body", "").startswith("psst back"), what="the 1:1 answer")
        self.assertEqual(back["type"], "chat")
        self.assertEqual(back["body"], "psst back [image/png attachment]")

        # Stream management: after 20 stanzas the bridge asks the server to
        # acknowledge them, so its resend queue stays short.
        self.assertNotIn("Received ack request", self.server.log_tail(100000))
        for n in range(21):
            self.command(xmpp={"type": "MessageSend", "value": {"recipient": "bob@localhost",
                                                                "content": text("n%d" % n), "attachments": []}})
        bob.wait(lambda e: e.get("body") == "n20", what="the 21st message")
        self.assertIn("Received ack request", self.server.log_tail(100000))

    def test_the_bridge_reconnects_and_rejoins_after_prosody_restarts(self):
        s = self.segue('bridge { "xmpp:%s", "mem:#bridge" }' % ROOM)
        self.server.stop()
        self.server.start()
        s.wait_for(lambda: s.stderr_count("logged in as bridge@localhost") >= 2, 60, "a second login")
        bob = self.bob()
        bob.command(say="after the restart", id="r1")
        s.value(lambda v: self.upsert(v, "mem", "after the restart"), 30, "bob's message in memory")
        self.command(mem={"type": "Text", "value": "memory still here"})
        bob.wait(lambda e: e.get("body", "").endswith("memory still here"), what="memory's message after the restart")

    def test_a_dropped_connection_resumes_the_session_and_loses_nothing(self):
        proxy = Proxy(self.server.port)
        self.addCleanup(proxy.close)
        bob = self.bob()
        s = self.segue('bridge { "xmpp:%s", "mem:#bridge" }' % ROOM, port=proxy.port)
        bob.command(say="before the cut", id="c0")
        s.value(lambda v: self.upsert(v, "mem", "before the cut"), what="c0 in memory")
        proxy.cut()  # Prosody keeps the session (XEP-0198 hibernation) and queues for it
        s.wait_for(lambda: s.stderr_count("reconnecting in") >= 1, 30, "the bridge noticing the cut")
        bob.command(say="said during the cut", id="c1")
        bob.wait(lambda e: e.get("id") == "c1" and e.get("stanza_id"), what="c1's reflection")
        proxy.release()
        s.wait_for(lambda: s.stderr_count("session resumed (XEP-0198)") >= 1, 30, "the resumption")
        s.value(lambda v: self.upsert(v, "mem", "said during the cut"), 30, "c1 in memory after the resumption")
        self.assertEqual(s.stderr_count("logged in as"), 2, "\n".join(s.err[-30:]))
        # Resumed, not rejoined: and still in the room both ways.
        self.command(mem={"type": "Text", "value": "memory after the cut"})
        bob.wait(lambda e: e.get("body", "").endswith("memory after the cut"), what="memory's message after the cut")
        self.assertEqual(len([v for v in s.values() if self.upsert(v, "mem", "said during the cut")]), 1)

    def test_a_silent_server_is_pinged_and_the_connection_replaced(self):
        proxy = Proxy(self.server.port)
        self.addCleanup(proxy.close)
        bob = self.bob()
        s = self.segue('bridge { "xmpp:%s", "mem:#bridge" }' % ROOM, port=proxy.port, ping_ms=500)
        proxy.stall()  # nothing passes, nothing closes
        s.wait_for(lambda: s.stderr_count("no answer to a ping") >= 1, 30, "the unanswered ping")
        proxy.release()
        s.wait_for(lambda: s.stderr_count("logged in as") >= 2, 30, "a new login")
        bob.command(say="after the stall", id="s1")
        s.value(lambda v: self.upsert(v, "mem", "after the stall"), 30, "bob's message after the stall")

    @unittest.skipUnless(NgIRCd.available(), "ngircd is not installed")
    def test_a_room_bridged_with_an_irc_channel_and_memory(self):
        irc_server = NgIRCd().start()
        self.addCleanup(irc_server.stop)
        raw = RawClient(irc_server.port, "carol")
        self.addCleanup(raw.close)
        raw.join("#x")
        bob = self.bob()
        s = self.segue('bridge { "xmpp:%s", "irc:#x", "mem:#bridge" }' % ROOM,
                       'irc = { script = "irc", options = { host = "127.0.0.1", port = %d, nick = "bridge" } },'
                       % irc_server.port)
        raw.expect(r"^:bridge!\S+ JOIN :?#x")
        bob.command(say="hi *irc* people", id="i1")
        raw.expect(r"PRIVMSG #x :<bob@xmpp> hi \x02irc\x02 people")
        s.value(lambda v: self.upsert(v, "mem", "people"), what="bob's message in memory")
        raw.say("#x", "hello \x02xmpp\x02")
        bob.wait(lambda e: e.get("body") == "<carol@irc> hello *xmpp*", what="carol's message in the room")


if __name__ == "__main__":
    unittest.main()
