"""Federation faults through the real binary: a peer that accepts TCP and
never answers, a peer that answers garbage, and a full disk while queueing.
In each case nothing acknowledged to Lua is lost: it is pushed or stored."""
import os
import resource
import socket
import subprocess
import threading
import unittest

from fed_util import free_port
from harness import SEGUE, wait_for, whole_lines, write
from postbox_util import PostboxNode

A, B = "a.example:2289", "b.example:2289"
FAST = {"push_tries": 2, "push_backoff_ms": 20, "pull_interval_ms": 60000, "request_timeout_ms": 500}


def bad_peer(test, answer):
    """A TCP server on loopback that reads requests and answers `answer`
    (bytes), or never answers when `answer` is None."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns = []

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            conns.append(c)
            try:
                c.recv(65536)
                if answer is not None:
                    c.sendall(answer)
                    c.close()
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()

    def close():
        srv.close()
        for c in conns:
            c.close()
    test.addCleanup(close)
    return "http://127.0.0.1:%d" % srv.getsockname()[1]


class BadPeers(unittest.TestCase):
    def check_queued(self, url):
        a = PostboxNode(A, sender=True, federation=dict(FAST, peers={B: url}))
        a.start()
        try:
            a.push(B, [1, 2, 3])
            self.assertTrue(a.wait_acks(3), a.stderr())
            self.assertEqual([x.get("how") for x in a.read_acks()], ["queued"] * 3, a.read_acks())
            self.assertEqual(a.queued(B), 3)
        finally:
            self.assertEqual(a.stop(), 0)

    def test_a_peer_that_never_answers_times_out_and_events_queue(self):
        self.check_queued(bad_peer(self, None))

    def test_a_peer_that_answers_garbage_is_an_error_and_events_queue(self):
        self.check_queued(bad_peer(self, b"\x00\xffthis is not HTTP\r\n\r\n"))

    def test_a_peer_that_answers_an_http_error_without_hrpc_body(self):
        self.check_queued(bad_peer(self, b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\noops"))


# A sender for the disk-full test whose own writes stay small (the file size
# limit applies to every file the process writes): "Q<id>" for an event
# acknowledged as queued, "E<id> <error>" for a refused one.
COMPACT_SENDER = """
local segue = require "segue"
local out = assert(io.open(os.getenv("POSTBOX_ACKS"), "a"))
out:setvbuf("line")
local n = tonumber(os.getenv("EVENTS"))
local function wave(from, to)
  for id = from, to do
    local ok, err = segue.postbox.push(%s, { user_added_to_guild = { user_id = id, guild_id = 1 } },
      function(how, e) out:write(e and ("E" .. id .. " " .. tostring(e):sub(1, 60)) or ("Q" .. id), "\\n") end)
    if not ok then out:write("E", id, " ", tostring(err):sub(1, 60), "\\n") end
  end
end
-- A few that fit, then (once they are queued) many that cannot.
if n > 0 then
  segue.timer(200, function() wave(1, 20) end)
  segue.timer(2500, function() wave(21, n) end)
end
"""


class DiskFull(unittest.TestCase):
    def test_nothing_is_acknowledged_that_was_not_stored(self):
        url = bad_peer(self, None)
        a = PostboxNode(A, federation=dict(FAST, peers={B: url}, request_timeout_ms=200))
        script = write(os.path.join(a.dir, "compact.lua"), COMPACT_SENDER % ('"%s"' % B))
        with open(a.config) as f:
            text = f.read()
        write(a.config, text.replace("scripts = {", "scripts = {%s, " % ('"%s"' % script), 1))
        a.env["EVENTS"] = "0"
        a.start()  # creates the store without a limit
        self.assertEqual(a.stop(), 0)
        # Again, with files limited to a little more than they hold now: the
        # queue soon cannot grow.
        data = os.path.join(a.dir, "data")
        limit = max(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data)) + 32 * 1024
        a.env["EVENTS"] = "3000"
        a.log = open(os.path.join(a.dir, "stderr.log"), "ab")
        a.proc = subprocess.Popen([SEGUE, "run", a.config], cwd=a.dir, env=a.env, stdout=subprocess.DEVNULL,
                                  stderr=a.log,
                                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))

        def acks():
            return [line.rstrip("\n").split(" ", 1) for line in whole_lines(a.acks) if line.strip()]
        try:
            self.assertTrue(wait_for(lambda: os.path.exists(a.acks) and len(acks()) >= 3000, 120),
                            a.stderr()[-2000:])
        finally:
            self.assertEqual(a.stop(), 0)
        queued = [int(x[0][1:]) for x in acks() if x[0][0] == "Q"]
        failed = [x for x in acks() if x[0][0] == "E"]
        self.assertTrue(failed, "the limit was never reached")
        self.assertTrue(queued, "nothing was queued before the limit")
        self.assertIn("ESTORE", failed[0][1])
        # Every acknowledged event is a row, in order; refused ones are not.
        rows = a.db("SELECT count(*) FROM outbox WHERE peer = ?", (B,))[0][0]
        self.assertEqual(rows, len(queued))


if __name__ == "__main__":
    unittest.main()
