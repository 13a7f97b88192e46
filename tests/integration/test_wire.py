"""Wire details from the conformance review (issue 18), against a peer in
Python: the hRPC client sends `Hrpc-Version: 1` and checks the header on
responses (another version is refused; none is taken as 1); attachments in
unpadded base64 are accepted from a backend, and passed on padded."""
import json
import os
import socket
import threading
import unittest

from fed_util import lua_json
from harness import run_lua


def peer(test, answer):
    """A loopback HTTP peer answering every request with `answer` (bytes);
    returns (base url, the requests it read)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    seen = []

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                data = b""
                c.settimeout(10)
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = c.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        k, _, v = line.partition(b":")
                        if k.strip().lower() == b"content-length":
                            length = int(v)
                    while len(body) < length:
                        body += c.recv(65536)
                    seen.append(head.decode(errors="replace"))
                    c.sendall(answer)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    test.addCleanup(srv.close)
    return "http://127.0.0.1:%d" % srv.getsockname()[1], seen


CALL = """
local segue = require "segue"
assert(segue.harmony.start { server_id = "a.example:1", data_dir = "./data",
  federation = { peers = { ["p.example:1"] = %s } } })
print(json.encode(segue.await(function()
  local r, err, code = segue.harmony.call("p.example:1", "Pull", {})
  return { ok = r ~= nil, err = err, code = code }
end, 20000)))
"""


def answer(version_header):
    return ("HTTP/1.1 200 OK\r\nContent-Type: application/hrpc\r\n%sContent-Length: 0\r\n"
            "Connection: close\r\n\r\n" % version_header).encode()


class HrpcVersion(unittest.TestCase):
    def test_requests_carry_the_version_and_version_1_answers_are_read(self):
        url, seen = peer(self, answer("Hrpc-Version: 1\r\n"))
        out = lua_json(CALL % json.dumps(url))
        self.assertTrue(out["ok"], out)
        self.assertEqual(len(seen), 1)
        self.assertRegex(seen[0], r"(?im)^Hrpc-Version: 1\r?$")
        self.assertRegex(seen[0], r"(?im)^Content-Type: application/hrpc\r?$")

    def test_an_answer_without_the_header_is_taken_as_version_1(self):
        url, _ = peer(self, answer(""))
        self.assertTrue(lua_json(CALL % json.dumps(url))["ok"])

    def test_an_answer_of_another_version_is_refused(self):
        url, _ = peer(self, answer("Hrpc-Version: 2\r\n"))
        out = lua_json(CALL % json.dumps(url))
        self.assertFalse(out["ok"])
        self.assertEqual(out["code"], "EPROTO", out)
        self.assertIn("Hrpc-Version 2", out["err"])


class Base64(unittest.TestCase):
    def test_unpadded_attachments_from_a_backend_are_accepted(self):
        # "xyzzy" is eHl6enk= padded; unpadded eHl6enk
        r = run_lua("""
            local b = [[
              local backend = ...
              return { MessageSend = function(msg, reply)
                backend:emit { type = "MessageUpsert", value = { id = "m1", sender = "s", recipient = "r",
                  content = { type = "Text", value = "t" }, create_time = 1, edit_time = 1,
                  attachments = { { mime = "text/plain", data = "eHl6enk" } } } }
                return "m1"
              end }
            ]]
            local f = assert(io.open("b.lua", "w")) f:write(b) f:close()
            assert(segue.add_backend("b", { script = "b.lua" }))
            local got
            segue.on("update", function(_, u) if u.type == "MessageUpsert" then got = u.value end end)
            local r, err = segue.await(function()
              local r, err = segue.backend("b"):request { type = "MessageSend", value = { recipient = "r",
                content = { type = "Text", value = "x" } } }
              while not got do segue.sleep(10) end
              return r, err
            end, 10000)
            out { id = r and r.value, err = err, data = got.attachments[1].data, state = segue.backend("b"):info().state }
        """)
        self.assertEqual(r.code, 0, r.stderr)
        v = r.values()[-1]
        self.assertEqual(v["id"], "m1", r.stderr)
        self.assertEqual(v["data"], "eHl6enk=")  # passed on padded
        self.assertEqual(v["state"], "running")
        self.assertNotIn("protocol violation", r.stderr)


if __name__ == "__main__":
    unittest.main()


class RetryInfo(unittest.TestCase):
    def test_a_503_for_a_peer_key_that_cannot_be_fetched_says_when_to_retry(self):
        from fed_util import PUSH, Node, curl, decode, error_fields, free_port, push_body
        from harness import run, tmpdir, write
        from test_federation_attacks import token
        a_id, x_id = "a.example:2289", "x.example:2289"
        # x's key pair exists, but x's Key endpoint is a port nothing listens on
        d = tmpdir()
        write(os.path.join(d, "x.lua"), 'data_dir = "data"\nserver_id = %s\n' % json.dumps(x_id))
        self.assertEqual(run(["key", "x.lua"], cwd=d).code, 0)
        a = Node(a_id, federation={"peers": {x_id: "http://127.0.0.1:%d" % free_port()}}).start()
        self.addCleanup(a.stop)
        tok = token(os.path.join(d, "data", "harmony.key"), x_id, audience=a_id)
        status, hdr, body = curl(a.url + PUSH, body=push_body(1), headers=["Authorization: " + tok])
        self.assertEqual(status, 503, a.stderr())
        fields = error_fields(body)
        self.assertEqual(fields["identifier"], "hrpc.unavailable")
        # the details are an hrpc.v1.RetryInfo, decoded by protoc
        self.assertRegex(decode("hrpc.v1.RetryInfo", fields["details"]), r"retry_after: [1-9]\d*")
