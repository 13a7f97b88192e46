"""Harmony federation through the real binary: the hRPC server driven with
curl and raw sockets, tokens refused for each reason, two segue processes
calling each other's Key and Push over loopback."""
import base64
import json
import os
import re
import socket
import threading
import time
import unittest

from harness import run, tmpdir, write, wait_for
from fed_util import (HANDLER, KEY, LUA_U64, PULL, PUSH, U64_MAX, Node, b64, curl, decode,
                      error_fields, free_port, lua_json, lua_value, raw_exchange)

A, B, C = "a.example:2289", "b.example:2289", "c.example:2289"
BLOCKED, OTHER = "blocked.example:2289", "other.example:2289"


def key_response(pk):
    """KeyResponse{key} as protoc-c and prost encode it."""
    return b"\x0a\x20" + pk


class Server(unittest.TestCase):
    """One node, its limits small so that each one is easy to cross."""

    @classmethod
    def setUpClass(cls):
        cls.node = Node(B, federation={"limits": {"max_body_bytes": 1024, "header_timeout_ms": 500,
                                                  "body_timeout_ms": 500}}).start()

    @classmethod
    def tearDownClass(cls):
        cls.node.stop()

    def test_healthz_answers_200_ok(self):
        status, hdr, body = curl(self.node.url + "/healthz", method="GET", content_type=None)
        self.assertEqual(status, 200)
        self.assertEqual(body, b"ok")
        self.assertRegex(hdr, r"(?i)hrpc-version: 1")

    def test_key_endpoint_serves_the_key_segue_key_prints(self):
        r = run(["key", self.node.config], cwd=self.node.dir)
        self.assertEqual(r.code, 0, r.stderr)
        printed = dict(line.split(" ", 1) for line in r.stdout.splitlines())
        self.assertEqual(printed["server_id"], B)
        pk = base64.b64decode(printed["public_key"], validate=True)
        self.assertEqual(len(pk), 32)
        status, hdr, body = curl(self.node.url + KEY)
        self.assertEqual(status, 200)
        self.assertRegex(hdr, r"(?i)content-type: application/hrpc")
        self.assertEqual(body, key_response(pk))
        self.assertIn('key: "', decode("protocol.auth.v1.KeyResponse", body,
                                       "protocol/auth/v1/auth.proto"))
        with open(self.node.key_file(), "rb") as f:
            self.assertEqual(f.read()[32:], pk)

    def test_wrong_method_is_405(self):
        status, _, body = curl(self.node.url + PUSH, method="GET")
        self.assertEqual(status, 405)
        self.assertEqual(error_fields(body)["identifier"], "hrpc.http.bad-unary-request")

    def test_missing_content_type_is_400(self):
        got, _ = raw_exchange(self.node.port, b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n"
                              b"Connection: close\r\n\r\n" % KEY.encode())
        self.assertTrue(got.startswith(b"HTTP/1.1 400 "), got)
        self.assertEqual(error_fields(got.split(b"\r\n\r\n", 1)[1])["identifier"],
                         "hrpc.http.bad-unary-request")

    def test_garbage_body_is_400_with_an_hrpc_error(self):
        status, hdr, body = curl(self.node.url + KEY, body=b"\x0a\x05ab")
        self.assertEqual(status, 400)
        self.assertRegex(hdr, r"(?i)content-type: application/hrpc")
        fields = error_fields(body)
        self.assertEqual(fields["identifier"], "hrpc.http.bad-unary-request")
        self.assertIn("protocol.auth.v1.KeyRequest", fields["human_message"])

    def test_oversized_body_is_413(self):
        got, closed = raw_exchange(self.node.port, b"POST %s HTTP/1.1\r\nHost: t\r\n"
                                   b"Content-Type: application/hrpc\r\nContent-Length: 5000\r\n\r\n"
                                   % KEY.encode())
        self.assertTrue(got.startswith(b"HTTP/1.1 413 "), got)
        self.assertTrue(closed)

    def test_slow_client_is_closed_without_an_answer(self):
        got, closed = raw_exchange(self.node.port, b"POST %s HTTP/1.1\r\nHost: t\r\n" % KEY.encode())
        self.assertTrue(closed, "the server kept a half-sent request open")
        self.assertEqual(got, b"")
        self.assertTrue(self.node.healthy())

    def test_chunked_request_is_answered(self):
        got, _ = raw_exchange(self.node.port, b"POST %s HTTP/1.1\r\nHost: t\r\n"
                              b"Content-Type: application/hrpc\r\nTransfer-Encoding: chunked\r\n"
                              b"Connection: close\r\n\r\n0\r\n\r\n" % KEY.encode())
        self.assertTrue(got.startswith(b"HTTP/1.1 200 "), got)
        self.assertEqual(len(got.split(b"\r\n\r\n", 1)[1]), 34)

    def test_push_without_a_token_is_refused(self):
        status, _, body = curl(self.node.url + PUSH)
        self.assertEqual(status, 400)
        self.assertEqual(error_fields(body)["identifier"], "h.bad-auth")


# Makes tokens and Push bodies with segue.harmony (token_create signs with
# the secret in the key file of the process the token claims to be).
TOKENS = """
local h = require("segue").harmony
local secret = assert(io.open(%s, "rb")):read("a")
local wrong = h.keygen()
local now = os.time()
local function push(uid)
  return (h.encode("protocol.sync.v1.PushRequest",
    { event = { user_added_to_guild = { user_id = uid, guild_id = 7 } } }):gsub(".", function(c)
      return ("%%02x"):format(c:byte()) end))
end
local function urlsafe(t) return (t:gsub("+", "-"):gsub("/", "_"):gsub("=", "")) end
print(json.encode {
  valid = h.token_create(secret, %s, now),
  valid_urlsafe = urlsafe(h.token_create(secret, %s, now)),
  stale = h.token_create(secret, %s, now - 3600),
  future = h.token_create(secret, %s, now + 3600),
  wrong_key = h.token_create(wrong, %s, now),
  not_allowed = h.token_create(secret, %s, now),
  blocked = h.token_create(secret, %s, now),
  push = { push(101), push(102), push(103), push(104), push(105), push(106), push(107), push(108), push(109) },
})
"""


class Tokens(unittest.TestCase):
    """B checks tokens claiming to come from C, whose key it fetches from C."""

    @classmethod
    def setUpClass(cls):
        cls.c = Node(C).start()
        d = tmpdir()
        handler = write(os.path.join(d, "fed_handler.lua"), HANDLER)
        cls.b = Node(B, scripts=[handler], federation={
            "peers": {C: cls.c.url},
            "allow": [A, C, BLOCKED],
            "block": [BLOCKED],
        }).start()
        q = json.dumps
        cls.t = lua_json(TOKENS % (q(cls.c.key_file()), q(C), q(C), q(C), q(C), q(C), q(OTHER),
                                   q(BLOCKED)))

    @classmethod
    def tearDownClass(cls):
        cls.b.stop()
        cls.c.stop()

    def push(self, token, i):
        headers = ["Authorization: " + token] if token is not None else []
        return curl(self.b.url + PUSH, body=bytes.fromhex(self.t["push"][i]), headers=headers)

    def user_ids(self):
        return [e["event"]["user_added_to_guild"]["user_id"] for e in self.b.read_events()
                if "user_added_to_guild" in e["event"]]

    def test_valid_tokens_are_accepted_and_reach_the_handler(self):
        for i, name in ((0, "valid"), (1, "valid_urlsafe")):
            status, _, body = self.push(self.t[name], i)
            self.assertEqual(status, 200, body)
            self.assertEqual(body, b"")  # PushResponse{}
        self.assertTrue(wait_for(lambda: {"101", "102"} <= set(self.user_ids())))
        senders = {e["from"] for e in self.b.read_events()}
        self.assertEqual(senders, {C})
        self.assertIn("fetched the server's key", self.b.stderr())

    def test_refused_tokens_get_their_status_and_identifier_and_never_reach_the_handler(self):
        cases = [
            ("stale", 400, "h.bad-token-data", "STALE"),
            ("future", 400, "h.bad-token-data", "FUTURE"),
            ("wrong_key", 400, "h.token-verify-failure", "BAD_SIGNATURE"),
            ("not_allowed", 403, "h.host-not-allowed", "HOST_NOT_ALLOWED"),
            ("blocked", 403, "h.host-not-allowed", "HOST_BLOCKED"),
            ("garbage", 400, "h.bad-token", "GARBAGE"),
            ("missing", 400, "h.bad-auth", "MISSING"),
        ]
        tokens = dict(self.t, garbage="not-a-token!", missing=None)
        for i, (name, want_status, want_id, reason) in enumerate(cases):
            with self.subTest(token=name):
                status, _, body = self.push(tokens[name], 2 + i)
                self.assertEqual(status, want_status)
                fields = error_fields(body)
                self.assertEqual(fields["identifier"], want_id)
                # the reason is logged, not sent
                self.assertEqual(fields["human_message"], "request refused")
                self.assertTrue(wait_for(lambda: "reason=%s " % reason in self.b.stderr()))
        # a valid push after them all is the fence: everything before it was handled
        status, _, _ = self.push(self.t["valid"], 0)
        self.assertEqual(status, 200)
        self.assertTrue(wait_for(lambda: "101" in self.user_ids()))
        refused = {str(103 + i) for i in range(len(cases))}
        self.assertEqual(refused & set(self.user_ids()), set())
        self.assertRegex(self.b.stderr(), r"level=warn peer=other\.example:2289 .*reason=HOST_NOT_ALLOWED")

    def test_fresh_tokens_at_once_are_each_verified_and_answered(self):
        # More distinct tokens at once than the thread pool has threads: each
        # is checked (on the pool) and answered.
        fresh = lua_json("""
local h = require("segue").harmony
local secret = assert(io.open(%s, "rb")):read("a")
local now, list = os.time(), {}
for i = 1, 12 do list[i] = h.token_create(secret, %s, now + i - 6) end
print(json.encode(list))
""" % (json.dumps(self.c.key_file()), json.dumps(C)))
        self.assertEqual(len(set(fresh)), 12)
        results = [None] * 12

        def one(i):
            results[i] = self.push(fresh[i], i % 2)[0]  # 101, 102: the ones that pass
        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(results, [200] * 12)

    def test_a_verified_token_changed_in_one_byte_is_checked_in_full(self):
        # The verified-token cache matches the whole header: the same token
        # with its signature altered is parsed and checked again (refused),
        # while the original still passes.
        status, _, _ = self.push(self.t["valid"], 0)
        self.assertEqual(status, 200)
        raw = bytearray(base64.b64decode(self.t["valid"]))
        raw[5] ^= 1  # inside the signature (field 1 comes first)
        status, _, body = self.push(b64(bytes(raw)), 0)
        self.assertEqual((status, error_fields(body)["identifier"]), (400, "h.token-verify-failure"))
        status, _, _ = self.push(self.t["valid"], 0)
        self.assertEqual(status, 200)

    def test_a_token_made_by_one_process_is_verified_by_another(self):
        made = lua_json("""
local h = require("segue").harmony
local secret, public = h.keygen()
print(json.encode { token = h.token_create(secret, "x.example:1", 1700000000),
                    pk = (public:gsub(".", function(c) return ("%02x"):format(c:byte()) end)) })
""")
        checked = lua_json("""
local h = require("segue").harmony
local pk = (%s):gsub("..", function(x) return string.char(tonumber(x, 16)) end)
local id, t = h.token_check(%s, pk, { now = 1700000030 })
local _, why, ident, status = h.token_check(%s, pk, { now = 1700000061 })
print(json.encode { id = id, t = t, why = why, ident = ident, status = status })
""" % (json.dumps(made["pk"]), json.dumps(made["token"]), json.dumps(made["token"])))
        self.assertEqual(checked["id"], "x.example:1")
        self.assertEqual(checked["t"], 1700000000)
        self.assertEqual((checked["ident"], checked["status"]), ("h.bad-token-data", 400))
        self.assertIn("61 s behind", checked["why"])


CALLER = LUA_U64 + """
local segue = require "segue"
assert(segue.harmony.start { server_id = %s, listen = "127.0.0.1:%d", data_dir = "./data",
  federation = { peers = { [%s] = %s, ["nobody.example:1"] = "http://127.0.0.1:%d" } } })
local function hex(s) return (s:gsub(".", function(c) return ("%%02x"):format(c:byte()) end)) end
local out = segue.await(function()
  local key = assert(segue.harmony.call(%s, "protocol.auth.v1.AuthService/Key", {}))
  local r1, e1 = segue.harmony.call(%s, "protocol.sync.v1.PostboxService/Push",
    { event = { user_invited = { user_id = "18446744073709551615", inviter_id = math.mininteger,
                                 invite_id = "inv-1" } } })
  local r2, e2 = segue.harmony.call(%s, "Push",
    { event = { user_rejected_invite = { guild_id = 0, user_id = (1 << 53) + 1, invite_id = "x" } } })
  local pull = segue.harmony.call(%s, "Pull", {})
  local r3, e3, c3 = segue.harmony.call("nobody.example:1", "Pull", {})
  return { key = hex(key.key), push1 = r1 and "ok" or e1, push2 = r2 and "ok" or e2,
           pull = #pull.event_queue, nobody = e3, nobody_code = c3 }
end, 30000)
print(json.encode(out))
"""


class TwoProcesses(unittest.TestCase):
    def test_a_calls_b_key_and_push_and_b_gets_the_exact_ids(self):
        d = tmpdir()
        handler = write(os.path.join(d, "fed_handler.lua"), HANDLER)
        a_port = free_port()
        b = Node(B, scripts=[handler], federation={
            "peers": {A: "http://127.0.0.1:%d" % a_port}, "allow": [A]}).start()
        try:
            q = json.dumps
            out = lua_json(CALLER % (q(A), a_port, q(B), q(b.url), free_port(), q(B), q(B), q(B),
                                     q(B)))
            with open(b.key_file(), "rb") as f:
                self.assertEqual(out["key"], f.read()[32:].hex())
            self.assertEqual((out["push1"], out["push2"], out["pull"]), ("ok", "ok", 0))
            self.assertRegex(out["nobody"], r"^EHTTP: ")
            self.assertEqual(out["nobody_code"], "EHTTP")
            self.assertTrue(wait_for(lambda: len(b.read_events()) == 2))
            events = [e["event"] for e in b.read_events()]
            self.assertEqual(events[0], {"user_invited": {
                "user_id": str(U64_MAX), "inviter_id": str(2**63), "invite_id": "inv-1"}})
            self.assertEqual(events[1], {"user_rejected_invite": {
                "guild_id": "0", "user_id": str(2**53 + 1), "invite_id": "x"}})
            self.assertEqual({e["from"] for e in b.read_events()}, {A})
        finally:
            self.assertEqual(b.stop(), 0)

    def test_sigterm_with_an_idle_keepalive_connection_exits_0(self):
        n = Node(B).start()
        s = socket.create_connection(("127.0.0.1", n.port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertTrue(s.recv(200).startswith(b"HTTP/1.1 200"))
        self.assertEqual(n.stop(), 0)
        s.settimeout(10)
        self.assertEqual(s.recv(10), b"")  # the server closed it
        s.close()


class KeyRotation(unittest.TestCase):
    def test_a_bad_signature_fetches_the_key_again_once(self):
        c = Node(C).start()
        b = Node(B, federation={"peers": {C: c.url}, "key_refetch_ms": 1000}).start()
        tokens = lambda: lua_json(TOKENS % tuple(json.dumps(x) for x in (
            c.key_file(), C, C, C, C, C, OTHER, BLOCKED)))
        try:
            t1 = tokens()
            status, _, _ = curl(b.url + PUSH, bytes.fromhex(t1["push"][0]), ["Authorization: " + t1["valid"]])
            self.assertEqual(status, 200)
            # C gets a new key pair on the same address
            c.stop()
            os.unlink(c.key_file())
            c.start()
            t2 = tokens()
            time.sleep(1.2)  # past key_refetch_ms, so the next bad signature may refetch
            status, _, _ = curl(b.url + PUSH, bytes.fromhex(t2["push"][0]), ["Authorization: " + t2["valid"]])
            self.assertEqual(status, 200)
            self.assertEqual(b.stderr().count("fetched the server's key"), 2)
            # a token with yet another key right away: refused, and no third fetch
            status, _, body = curl(b.url + PUSH, bytes.fromhex(t2["push"][0]),
                                   ["Authorization: " + t2["wrong_key"]])
            self.assertEqual((status, error_fields(body)["identifier"]), (400, "h.token-verify-failure"))
            self.assertEqual(b.stderr().count("fetched the server's key"), 2)
        finally:
            b.stop()
            c.stop()


class Config(unittest.TestCase):
    def test_bad_federation_keys_are_reported_with_file_and_line(self):
        d = tmpdir()
        cfg = write(os.path.join(d, "bad.lua"), "\n".join([
            'server_id = "b.example"',
            'listen = "localhost:80"',
            'federation = {',
            '  peers = { ["c.example:1"] = "ftp://x" },',
            '  token_window = 1.5,',
            '  limits = { max_body_bytez = 1 },',
            '}',
        ]) + "\n")
        r = run(["check", cfg], cwd=d)
        self.assertEqual(r.code, 1)
        self.assertIn("bad.lua:1: server_id: expected domain:port", r.stderr)
        self.assertIn("bad.lua:2: listen: expected an IP address and port", r.stderr)
        self.assertIn('bad.lua:4: federation.peers.c.example:1: expected a base URL', r.stderr)
        self.assertIn("bad.lua:5: federation.token_window: expected a positive integer", r.stderr)
        self.assertIn("bad.lua:6: federation.limits.max_body_bytez: unknown limit", r.stderr)

    def test_a_port_in_use_is_a_clear_start_up_error(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        n = Node(B, port=s.getsockname()[1])
        r = run(["run", n.config], cwd=n.dir, timeout=30)
        s.close()
        self.assertEqual(r.code, 1)
        self.assertRegex(r.stderr, r"federation: EADDRINUSE: cannot listen on 127\.0\.0\.1:\d+: address already in use")


if __name__ == "__main__":
    unittest.main()
