"""The IRC backend against a real IRC server (Debian's ngircd on a loopback
port) and a second, raw IRC client: bridging through the memory backend with
formatting, DMs, long messages, nick collisions, server password, TLS,
standalone mode, and reconnecting after the server restarts."""
import json
import os
import re
import subprocess
import threading
import time
import unittest

from harness import SEGUE, run_lua, tmpdir, write
from irc_server import FakeIrc, NgIRCd, RawClient

SOURCE = os.environ.get("SEGUE_SOURCE_DIR") or os.path.join(os.path.dirname(__file__), "..", "..")

# The bridge the router's rules will replace: #a -> memory, memory -> #b,
# DMs answered with an echo. Every update is printed as a JSON line.
BRIDGE = r"""
local segue = require "segue"
local json = require "segue.json"
local irc, mem = segue.backend("irc"), segue.backend("mem")
local function out(v) io.stdout:write(json.encode(v), "\n") io.stdout:flush() end
local mem_room
local function text(s) return { type = "Text", value = s } end

segue.on("backend", function(name, state)
  if state ~= "running" then return end
  if name == "mem" then mem_room = mem:request { type = "RoomLookup", value = "#bridge" }.value end
  if name ~= "irc" then return end
  for _, ch in ipairs { "#A", "#b" } do
    local id = irc:request { type = "RoomLookup", value = ch }
    local ok, err = irc:request { type = "RoomJoin", value = id.value }
    out { joined = id.value, ok = ok and ok.type, err = err }
  end
  while not mem_room do segue.sleep(10) end
  for _, content in ipairs(STARTUP or {}) do
    mem:request { type = "MessageSend", value = { recipient = mem_room, content = content } }
  end
end)

segue.on("update", function(name, u)
  if u.type ~= "MessageUpsert" then return end
  local m = u.value
  out { from = name, msg = m }
  if name == "irc" and m.recipient == "#a" then
    mem:request { type = "MessageSend", value = { recipient = mem_room, content = m.content } }
  elseif name == "irc" and not m.recipient:match("^#") then
    local r, err = irc:request { type = "MessageSend", value = { recipient = m.sender,
      content = { type = "Concat", value = { text("echo: "), m.content } } } }
    out { dm_reply = r, err = err }
  elseif name == "mem" then
    local r, err = irc:request { type = "MessageSend", value = { recipient = "#b", content = m.content } }
    out { sent = r, err = err }
  end
end)
"""


class Segue:
    """`segue run CONFIG` with stdout and stderr collected as they come."""

    def __init__(self, args, cwd):
        self.proc = subprocess.Popen([SEGUE] + args, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = [], []
        for stream, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._collect, args=(stream, into), daemon=True).start()

    @staticmethod
    def _collect(stream, into):
        for line in stream:
            into.append(line.decode(errors="replace").rstrip("\n"))

    def values(self):
        vals = []
        for line in list(self.out):
            try:
                vals.append(json.loads(line))
            except ValueError:
                pass
        return vals

    def wait_for(self, pred, timeout=20, what="a condition"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = pred()
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError("segue: no %s; stderr:\n%s" % (what, "\n".join(self.err[-40:])))

    def value(self, pred, timeout=20, what="value"):
        return self.wait_for(lambda: next((v for v in self.values() if pred(v)), None), timeout, what)

    def stderr_count(self, text):
        return sum(1 for line in self.err if text in line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def lua(v):
    """A Python value as a Lua literal (strings, numbers, booleans, lists, dicts)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else "\\%03d" % b
                             for b in v.encode()) + '"'  # bytes escaped as \ddd
    if isinstance(v, list):
        return "{ " + ", ".join(lua(x) for x in v) + " }"
    return "{ " + ", ".join("[%s] = %s" % (json.dumps(k), lua(x)) for k, x in v.items()) + " }"


@unittest.skipUnless(NgIRCd.available(), "ngircd is not installed")
class IrcBridge(unittest.TestCase):
    def start_server(self, **kw):
        server = NgIRCd(**kw).start()
        self.addCleanup(server.stop)
        return server

    def client(self, server, nick, channels=("#a", "#b"), **kw):
        c = RawClient(server.port, nick, **kw)
        self.addCleanup(c.close)
        c.join(*channels)
        return c

    def start_segue(self, server, options=None, startup=()):
        d = tmpdir()
        opts = {"host": "127.0.0.1", "port": server.port, "nick": "bridge", "flood_rate": 20,
                "flood_burst": 20}
        opts.update(options or {})
        write(os.path.join(d, "bridge.lua"), "STARTUP = %s\n%s" % (lua(list(startup)), BRIDGE))
        cfg = write(os.path.join(d, "segue.lua"), """
            data_dir = "data"
            backends = {
              irc = { script = "irc", options = %s },
              mem = { script = "memory" },
            }
            scripts = { "bridge.lua" }
        """ % lua(opts))
        s = Segue(["run", cfg], d)
        self.addCleanup(s.stop)
        return s

    def test_irc_messages_reach_memory_and_memory_messages_reach_irc_with_formatting(self):
        server = self.start_server()
        alice = self.client(server, "alice")
        s = self.start_segue(server, startup=[
            {"type": "Italic", "value": {"type": "Text", "value": "hello from memory"}}])
        alice.expect(r"^:bridge!\S+ JOIN :?#[aA]$")
        alice.expect(r"^:bridge!\S+ JOIN :?#b$")
        self.assertEqual(alice.expect(r"PRIVMSG #b "), ":bridge!~bridge@127.0.0.1 PRIVMSG #b :\x1dhello from memory\x1d")
        # the script prints a join once its RoomJoin answered, which may be
        # after the server announced it to alice
        s.value(lambda v: v.get("joined") == "#b", what="the script's join of #b")
        self.assertEqual([v["joined"] for v in s.values() if "joined" in v], ["#a", "#b"])

        alice.say("#a", "\x02bold\x02 and plain")
        line = alice.expect(r"PRIVMSG #b ")
        self.assertTrue(line.endswith("PRIVMSG #b :\x02bold\x02 and plain"), line)
        got = s.value(lambda v: v.get("from") == "irc", what="IRC message")["msg"]
        self.assertEqual(got["sender"], "alice")
        self.assertEqual(got["recipient"], "#a")
        self.assertEqual(got["content"], {"type": "Concat", "value": [
            {"type": "Bold", "value": {"type": "Text", "value": "bold"}},
            {"type": "Text", "value": " and plain"}]})
        mem = s.value(lambda v: v.get("from") == "mem" and v["msg"]["content"] == got["content"],
                      what="memory message")
        self.assertEqual(mem["msg"]["sender"], "segue")

        alice.say("#a", "\x01ACTION waves\x01")
        self.assertTrue(alice.expect(r"PRIVMSG #b ").endswith(":\x01ACTION waves\x01"))

    def test_a_direct_message_is_answered_to_the_sender(self):
        server = self.start_server()
        alice = self.client(server, "alice")
        s = self.start_segue(server)
        alice.expect(r"^:bridge!\S+ JOIN :?#b$")
        alice.say("bridge", "\x1dhi\x1d there")
        self.assertEqual(alice.expect(r" PRIVMSG alice "),
                         ":bridge!~bridge@127.0.0.1 PRIVMSG alice :echo: \x1dhi\x1d there")
        dm = s.value(lambda v: v.get("from") == "irc", what="the DM")["msg"]
        self.assertEqual((dm["sender"], dm["recipient"]), ("alice", "bridge"))

    def test_a_long_message_is_split_within_the_line_limit_on_character_boundaries(self):
        server = self.start_server()
        alice = self.client(server, "alice")
        text = "".join("%d:é€ " % i for i in range(300))  # about 2.9 KB of multi-byte text
        self.start_segue(server, startup=[{"type": "Bold", "value": {"type": "Text", "value": text}}])
        alice.expect(r"^:bridge!\S+ JOIN :?#b$")
        pieces = []
        while sum(len(p) for p in pieces) < len(text.replace(" ", "")) - 5:
            line = alice.expect(r" PRIVMSG #b ")
            self.assertLessEqual(len(line.encode()) + 2, 512, line)
            body = line.split(" :", 1)[1]
            self.assertTrue(body.startswith("\x02"), "bold reopened on every line: %r" % body[:10])
            pieces.append(body.replace("\x02", "").replace(" ", ""))
        self.assertGreater(len(pieces), 5)
        self.assertEqual("".join(pieces), text.replace(" ", ""))

    def test_a_taken_nick_gets_an_underscore(self):
        server = self.start_server()
        squatter = self.client(server, "bridge", channels=("#a",))
        self.start_segue(server)
        squatter.expect(r"^:bridge_!\S+ JOIN :?#a$")

    def test_the_server_password_is_sent(self):
        server = self.start_server(password="s3cret")
        alice = self.client(server, "alice", password="s3cret")
        self.start_segue(server, {"password": "s3cret"})
        alice.expect(r"^:bridge!\S+ JOIN :?#b$")

    def test_tls_connects_to_a_self_signed_server_only_with_verify_off(self):
        server = self.start_server(tls=True)
        alice = self.client(server, "alice")
        s = self.start_segue(server, {"port": server.tls_port, "tls": True, "nick": "checked"})
        s.wait_for(lambda: s.stderr_count("certificate verify failed"), what="a verification failure")
        s2 = self.start_segue(server, {"port": server.tls_port, "tls": True, "verify": False})
        alice.expect(r"^:bridge!\S+ JOIN :?#b$")
        alice.say("#a", "over \x02TLS\x02")
        self.assertTrue(alice.expect(r"PRIVMSG #b ").endswith(":over \x02TLS\x02"))
        self.assertNotIn("checked", " ".join(alice.seen))
        s2.stop()

    def test_the_backend_reconnects_and_rejoins_after_the_server_restarts(self):
        server = self.start_server()
        alice = self.client(server, "alice")
        s = self.start_segue(server, {"reconnect_ms": 1500})
        alice.expect(r"^:bridge!\S+ JOIN :?#b$")
        server.stop()
        alice.close()
        # Down long enough for one failed attempt; the next is 3 s later.
        s.wait_for(lambda: s.stderr_count("reconnecting in") >= 2, what="a failed reconnect")
        server.start()
        alice = self.client(server, "alice")
        rejoined = {alice.expect(r"^:bridge!\S+ JOIN ", timeout=30).split()[-1].lstrip(":").lower()
                    for _ in range(2)}
        self.assertEqual(rejoined, {"#a", "#b"})
        alice.say("#a", "after the restart")
        self.assertTrue(alice.expect(r"PRIVMSG #b ").endswith(":after the restart"))
        self.assertIn("registered on 127.0.0.1", "\n".join(s.err))


@unittest.skipUnless(NgIRCd.available(), "ngircd is not installed")
class IrcStandalone(unittest.TestCase):
    def test_the_backend_file_runs_standalone_on_stdin_and_stdout(self):
        server = NgIRCd().start()
        self.addCleanup(server.stop)
        alice = RawClient(server.port, "alice")
        self.addCleanup(alice.close)
        alice.join("#solo")
        p = subprocess.Popen([SEGUE, "backend", os.path.join(SOURCE, "backends", "irc.lua"),
                              "host=127.0.0.1", "port=%d" % server.port, "nick=solo"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: p.poll() is None and p.kill())
        init = json.loads(p.stdout.readline())
        self.assertEqual(init["backend_name"], "irc")
        requests = [
            {"sequence_number": 1, "body": {"type": "RoomJoin", "value": "#SOLO"}},
            {"sequence_number": 2, "body": {"type": "MessageSend", "value": {
                "recipient": "#solo", "attachments": [],
                "content": {"type": "Underline", "value": {"type": "Text", "value": "standalone"}}}}},
        ]
        for r in requests:
            p.stdin.write((json.dumps(r) + "\n").encode())
            p.stdin.flush()
        answers = {}
        while len(answers) < 2:
            v = json.loads(p.stdout.readline())
            if "sequence_number" in v:
                answers[v["sequence_number"]] = v["body"]
        self.assertEqual(answers[1], {"type": "Success", "value": None})
        self.assertEqual(answers[2]["type"], "MessageID")
        alice.expect(r"^:solo!\S+ JOIN :?#solo$")
        self.assertTrue(alice.expect(r"PRIVMSG #solo ").endswith(":\x1fstandalone\x1f"))
        alice.say("#solo", "back")
        while True:
            v = json.loads(p.stdout.readline())
            if v.get("type") == "MessageUpsert":
                break
        self.assertEqual(v["value"]["content"], {"type": "Text", "value": "back"})
        p.stdin.close()
        self.assertEqual(p.wait(15), 0, p.stderr.read().decode())


class IrcScripted(unittest.TestCase):
    """Against a scripted server: SASL, which ngircd lacks, and timing."""

    def run_irc(self, options, body, tries=10, server=None):
        server = server or FakeIrc()
        self.addCleanup(server.close)
        opts = {"host": "127.0.0.1", "port": server.port, "nick": "bot"}
        opts.update(options)
        r = run_lua("""
            assert(segue.add_backend("irc", { script = "irc", options = %s, retry_max_tries = %d }))
            local irc = segue.backend("irc")
            out(segue.await(function() %s end, 20000))
        """ % (lua(opts), tries, body))
        server.wait_done()  # segue exited: every line it sent is read
        return server, r

    def test_sasl_plain_logs_in_before_registration_ends(self):
        server, r = self.run_irc({"sasl_user": "bob", "sasl_password": "hunter2"}, """
            local ok, err = irc:request { type = "RoomJoin", value = "#x" }
            return { ok = ok and ok.type, err = err }
        """)
        self.assertEqual(r.values(), [{"ok": "Success"}], r.stderr)
        order = [l for _, l in server.lines if l.split(" ")[0] in ("CAP", "AUTHENTICATE", "NICK", "USER", "JOIN")]
        self.assertEqual(order, ["CAP LS 302", "NICK bot", "USER bot 0 * :segue bridge", "CAP REQ :sasl",
                                 "AUTHENTICATE PLAIN", "AUTHENTICATE Ym9iAGJvYgBodW50ZXIy", "CAP END", "JOIN #x"])
        self.assertIn("SASL login succeeded", r.stderr)

    def test_sasl_uses_scram_sha_256_when_the_server_lists_it(self):
        server, r = self.run_irc({"sasl_user": "bob", "sasl_password": "hunter2"}, """
            local ok, err = irc:request { type = "RoomJoin", value = "#x" }
            return { ok = ok and ok.type, err = err }
        """, server=FakeIrc(sasl_mechs="PLAIN,SCRAM-SHA-1,SCRAM-SHA-256", password="hunter2"))
        self.assertEqual(r.values(), [{"ok": "Success"}], r.stderr)
        auth = [l for _, l in server.lines if l.startswith("AUTHENTICATE")]
        self.assertEqual(auth[0], "AUTHENTICATE SCRAM-SHA-256")
        self.assertEqual(len(auth), 4, auth)  # client-first, client-final, then "+" after the server's proof
        self.assertNotIn("hunter2", " ".join(l for _, l in server.lines))
        self.assertIn("SASL login succeeded (SCRAM-SHA-256)", r.stderr)

    def test_a_wrong_scram_password_is_refused_and_the_session_goes_on(self):
        server, r = self.run_irc({"sasl_user": "bob", "sasl_password": "wrong"}, """
            local ok, err = irc:request { type = "RoomJoin", value = "#x" }
            return { ok = ok and ok.type, err = err }
        """, server=FakeIrc(sasl_mechs="SCRAM-SHA-1", password="hunter2"))
        self.assertEqual(r.values(), [{"ok": "Success"}], r.stderr)
        self.assertIn("AUTHENTICATE SCRAM-SHA-1", [l for _, l in server.lines])
        self.assertIn("SASL login failed", r.stderr)
        self.assertNotIn("SASL login succeeded", r.stderr)

    def test_a_silent_server_is_pinged_and_then_left(self):
        server, r = self.run_irc({"idle_ms": 300}, """
            assert(irc:request { type = "RoomJoin", value = "#x" })
            segue.sleep(1500)
            return true
        """)
        self.assertEqual(r.values(), [True], r.stderr)
        self.assertEqual(len(server.sent("PING :segue")), 1)
        self.assertIn("no answer to PING in 300 ms; reconnecting", r.stderr)

    def test_flood_control_spaces_messages_after_the_burst(self):
        # The six go out of one loop turn (a request round trip each would
        # spread the burst), and the JOIN queued behind them is answered
        # only once the server has read all six.
        server, r = self.run_irc({"flood_rate": 5, "flood_burst": 2}, """
            local got = {}
            for i = 1, 6 do
              assert(irc:request({ type = "MessageSend", value = { recipient = "someone",
                content = { type = "Text", value = "m" .. i } } },
                function(id, err) got[#got + 1] = id and id.type or err end))
            end
            while #got < 6 do segue.sleep(10) end
            assert(irc:request { type = "RoomJoin", value = "#after" })
            return got
        """)
        self.assertEqual(r.values(), [["MessageID"] * 6], r.stderr)
        times = [t for t, _ in server.sent("PRIVMSG someone ")]
        self.assertEqual(len(times), 6)
        self.assertLess(times[1] - times[0], 0.1)  # the burst
        # 5 per second after it: the k-th line (from 0) needs k - 1 tokens
        # beyond the burst, so it leaves (k - 1) / 5 s after the first at
        # the earliest. Measured from the first, not between neighbours: a
        # pump timer that fires late leaves more tokens for the next line;
        # 0.1 s for the server thread noting the first line late.
        after = [round(t - times[0], 3) for t in times]
        self.assertTrue(all(after[k] >= (k - 1) * 0.2 - 0.1 for k in range(2, 6)), after)

    # Issue 12 item 9: the send queue is bounded and formatting never blocks.

    def test_a_message_of_many_lines_stops_at_max_lines_with_a_notice(self):
        server, r = self.run_irc({"max_lines": 3, "flood_rate": 50, "flood_burst": 10}, """
            local text = string.rep("x\\n", 32768)  -- 64 KB: 32,768 lines
            local id, err = irc:request { type = "MessageSend", value = { recipient = "someone",
              content = { type = "Text", value = text } } }
            segue.sleep(500)
            return { id = id and id.type, err = err }
        """)
        self.assertEqual(r.values(), [{"id": "MessageID"}], r.stderr)
        self.assertEqual([l for _, l in server.sent("PRIVMSG someone ")], ["PRIVMSG someone x"] * 3)
        self.assertEqual([l for _, l in server.sent("NOTICE someone ")],
                         ["NOTICE someone :(the rest of this message was cut: it is longer than 3 lines)"])
        self.assertIn("cut after max_lines = 3 lines", r.stderr)

    def test_a_full_queue_for_one_target_refuses_more_and_other_targets_go_on(self):
        # The error is retryable (the host retries it with backoff: nothing is
        # lost); one try here shows the refusal itself.
        server, r = self.run_irc({"max_queue": 3, "flood_rate": 0.2, "flood_burst": 1}, tries=1, body="""
            local out = {}
            local function say(to, s)
              local id, err = irc:request { type = "MessageSend", value = { recipient = to,
                content = { type = "Text", value = s } } }
              out[#out + 1] = id and id.type or err
            end
            for i = 1, 5 do say("a", "m" .. i) end
            say("b", "other")
            return out
        """)
        (out,) = r.values()
        # m1 goes out at once (the burst); m2..m4 fill a's queue of 3; m5 is refused
        self.assertEqual(out[:4], ["MessageID"] * 4, r.stderr)
        self.assertIn("the send queue for a is full (3 lines waiting, max_queue = 3)", out[4])
        self.assertEqual(out[5], "MessageID")
        self.assertEqual([l for _, l in server.sent("PRIVMSG a ")], ["PRIVMSG a m1"])

    def test_a_4_MB_message_does_not_stall_the_loop(self):
        server, r = self.run_irc({"flood_rate": 50, "flood_burst": 20}, """
            local gap, last, ticking = 0, segue.now(), true
            local function tick()
              local now = segue.now()
              gap = math.max(gap, now - last)
              last = now
              if ticking then segue.timer(20, tick) end
            end
            segue.timer(20, tick)
            local text = string.rep("word\\nwith \\2bold\\2 é ", 4 * 1024 * 1024 // 20)
            local id, err = irc:request { type = "MessageSend", value = { recipient = "someone",
              content = { type = "Text", value = text } } }
            segue.sleep(300)
            ticking = false
            return { id = id and id.type, err = err, gap = gap }
        """)
        (v,) = r.values()
        self.assertEqual(v.get("id"), "MessageID", r.stderr)
        self.assertEqual(len(server.sent("PRIVMSG someone ")), 10)  # max_lines' default
        self.assertEqual(len(server.sent("NOTICE someone ")), 1)
        # Formatting stalled the loop 18.7 s before the bound (13 s in the
        # report); what remains is the host carrying 4 MB to the backend:
        # 0.1 s on an idle machine, 2.5 s with the machine loaded 6-fold.
        self.assertLess(v["gap"], 10000, v)


if __name__ == "__main__":
    unittest.main()
