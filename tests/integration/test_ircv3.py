"""The IRC backend's IRCv3 side against a real IRCv3 server (Debian's
InspIRCd 3 on a loopback port with its ircv3 modules): message ids and times
from the server, echo-message confirmation, and draft/chathistory history
through a test-side responder in front of the server (InspIRCd 3 has none).
Raw clients on the same server see the server's tags, to compare with."""
import calendar
import os
import shutil
import time
import unittest

from harness import tmpdir, write
from inspircd import InspIRCd, ChatHistoryProxy
from irc_server import RawClient
from test_irc import Segue, lua

# Prints what the backend announces; acts on what carol asks in the channel.
SCRIPT = r"""
local segue = require "segue"
local json = require "segue.json"
local irc = segue.backend("irc")
local function out(v) io.stdout:write(json.encode(v), "\n") io.stdout:flush() end
segue.on("backend", function(name, state)
  if name ~= "irc" or state ~= "running" then return end
  local ok, err = irc:request { type = "RoomJoin", value = CHANNEL }
  out { joined = ok and ok.type, err = err }
end)
segue.on("update", function(name, u)
  if u.type ~= "MessageUpsert" then return end
  local m = u.value
  out { upsert = m }
  if m.sender ~= "carol" or m.content.type ~= "Text" then return end
  if m.content.value == "please send" then
    local r, err = irc:request { type = "MessageSend", value = { recipient = CHANNEL, attachments = {},
      content = { type = "Text", value = "first line\nsecond line" } } }
    out { sent = r and r.value, err = err }
  elseif m.content.value == "please fetch history" then
    local r, err = irc:request { type = "MessageGetBefore", value = m.id }
    out { history = r and r.type, err = err }
  end
end)
"""

CAPS = ("message-tags", "server-time")


def server_ms(stamp):
    """An IRCv3 time tag ("2026-11-26T14:49:24.277Z") as ms since the epoch."""
    whole, frac = stamp.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) * 1000 + int(frac[:3].ljust(3, "0"))


def tags_of(line):
    raw = line[1:].split(" ", 1)[0] if line.startswith("@") else ""
    return dict(t.split("=", 1) for t in raw.split(";") if "=" in t)


@unittest.skipUnless(InspIRCd.available(), "inspircd is not installed (build.sh installs it)")
class IrcV3(unittest.TestCase):
    def setUp(self):
        self.server = InspIRCd().start()
        self.addCleanup(self.server.stop)

    def client(self, nick, channel, port=None):
        c = RawClient(port or self.server.port, nick, caps=CAPS)
        self.addCleanup(c.close)
        c.join(channel)
        return c

    def start_segue(self, channel, port=None):
        d = tmpdir()
        self.addCleanup(shutil.rmtree, d, True)
        opts = {"host": "127.0.0.1", "port": port or self.server.port, "nick": "bridge",
                "flood_rate": 20, "flood_burst": 20}
        write(os.path.join(d, "script.lua"), "CHANNEL = %s\n%s" % (lua(channel), SCRIPT))
        cfg = write(os.path.join(d, "segue.lua"), """
            data_dir = "data"
            backends = { irc = { script = "irc", options = %s } }
            scripts = { "script.lua" }
        """ % lua(opts))
        s = Segue(["run", cfg], d)
        self.addCleanup(s.stop)
        s.value(lambda v: "joined" in v, what="the join")
        self.assertEqual(s.value(lambda v: "joined" in v)["joined"], "Success")
        return s

    def upserts(self, s, sender):
        return [v["upsert"] for v in s.values() if "upsert" in v and v["upsert"]["sender"] == sender]

    def test_message_ids_and_times_come_from_the_server(self):
        carol = self.client("carol", "#v3")
        dave = self.client("dave", "#v3")
        s = self.start_segue("#v3")
        dave.expect(r" JOIN :?#v3$")
        carol.say("#v3", "hello \x02v3\x02")
        relayed = dave.expect(r":carol!\S+ PRIVMSG #v3 ")
        tags = tags_of(relayed)
        self.assertIn("msgid", tags, relayed)
        m = s.wait_for(lambda: next(iter(self.upserts(s, "carol")), None), what="carol's message")
        self.assertEqual(m["id"], tags["msgid"])
        # the server's time to the millisecond, not segue's clock (whole seconds)
        self.assertEqual(m["create_time"], server_ms(tags["time"]))
        self.assertEqual(m["recipient"], "#v3")
        self.assertEqual(m["content"], {"type": "Concat", "value": [
            {"type": "Text", "value": "hello "}, {"type": "Bold", "value": {"type": "Text", "value": "v3"}}]})

    def test_a_sent_message_is_announced_once_with_the_servers_id_after_the_echo(self):
        carol = self.client("carol", "#v3")
        s = self.start_segue("#v3")
        carol.expect(r" JOIN :?#v3$")
        carol.say("#v3", "please send")
        first = carol.expect(r":bridge!\S+ PRIVMSG #v3 :first line$")
        second = carol.expect(r":bridge!\S+ PRIVMSG #v3 :second line$")
        sent = s.value(lambda v: "sent" in v, what="the MessageSend answer")
        self.assertEqual(sent["sent"], tags_of(first)["msgid"], sent)
        self.assertNotEqual(tags_of(second)["msgid"], tags_of(first)["msgid"])
        time.sleep(0.5)  # a second announcement would come with the second echo
        own = self.upserts(s, "bridge")
        self.assertEqual(len(own), 1, own)
        self.assertEqual(own[0]["id"], tags_of(first)["msgid"])
        self.assertEqual(own[0]["content"], {"type": "Text", "value": "first line\nsecond line"})
        self.assertEqual(own[0]["create_time"], server_ms(tags_of(first)["time"]))
        self.assertIn("IRCv3 capabilities:", "\n".join(s.err))

    def test_history_before_a_message_comes_from_chathistory(self):
        proxy = ChatHistoryProxy(self.server.port)
        self.addCleanup(proxy.close)
        carol = self.client("carol", "#hist")
        dave = self.client("dave", "#hist", port=proxy.port)  # the responder records what it relays
        carol.say("#hist", "older one")
        carol.say("#hist", "older two")
        old = [tags_of(dave.expect(r"PRIVMSG #hist :older one$")), tags_of(dave.expect(r"PRIVMSG #hist :older two$"))]
        s = self.start_segue("#hist", port=proxy.port)
        carol.expect(r":bridge!\S+ JOIN :?#hist$")
        carol.say("#hist", "please fetch history")
        self.assertEqual(s.value(lambda v: "history" in v, what="the MessageGetBefore answer"),
                         {"history": "Success"})
        asked = next(m for m in self.upserts(s, "carol") if m["content"]["value"] == "please fetch history")
        self.assertEqual(proxy.commands, ["CHATHISTORY BEFORE #hist msgid=%s 50" % asked["id"]])
        got = [m for m in self.upserts(s, "carol") if m["content"]["value"].startswith("older")]
        self.assertEqual([(m["id"], m["create_time"], m["content"]["value"]) for m in got],
                         [(old[0]["msgid"], server_ms(old[0]["time"]), "older one"),
                          (old[1]["msgid"], server_ms(old[1]["time"]), "older two")])
        self.assertTrue(all(m["recipient"] == "#hist" for m in got))


if __name__ == "__main__":
    unittest.main()
