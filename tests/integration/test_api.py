"""The client API through the real binary (docs/api.md): authentication,
every route, paging with the backend's MessageGetBefore as fallback, sending
through a bridge, the event stream with playback after a disconnect and a
restart, limits, and /metrics through promtool."""
import os
import shutil
import socket
import subprocess
import time
import unittest

from api_util import Api, q
from harness import SEGUE, wait_for, write


def texts(msgs):
    return [m["content"]["value"] if m["content"]["type"] == "Text" else m["content"] for m in msgs]


def plain(content):
    """The text of a MessageContent (Concat of Texts, as the router makes)."""
    if content["type"] == "Concat":
        return "".join(plain(c) for c in content["value"])
    if isinstance(content["value"], dict):
        return plain(content["value"])
    return str(content["value"])


def raw_exchange(port, data):
    """Sends `data` on a new connection; returns all the server sends until it closes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(data)
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return got
            got += chunk
    finally:
        s.close()


class Auth(unittest.TestCase):
    def test_tokens_users_and_admin_routes(self):
        api = Api(self)
        bob = api.user_add("bob")
        # no token, a wrong one, a malformed header: 401 with a JSON error
        st, h, body = api.request("GET", "/api/v1/backends")
        self.assertEqual((st, body["code"]), (401, "EAUTH"))
        self.assertIn("application/json", h["content-type"])
        st, _, body = api.request("GET", "/api/v1/backends", token="sgt_wrong")
        self.assertEqual((st, body["code"]), (401, "EAUTH"))
        st, _, body = api.request("GET", "/api/v1/backends", headers={"Authorization": "Basic eDp5"})
        self.assertEqual(st, 401)
        # a header with an empty value (with or without a space) before the
        # token does not take the next header's name with it
        for empty in (b"X-Empty:\r\n", b"X-Empty: \r\n", b"X-A:\r\nX-B:\r\n"):
            # (Connection: close: the server keeps connections open, and
            # would close this one only after header_timeout_ms, 10 s)
            got = raw_exchange(api.port, b"GET /api/v1/backends HTTP/1.1\r\nHost: x\r\n" + empty +
                               b"Authorization: Bearer " + api.admin.encode() +
                               b"\r\nConnection: close\r\n\r\n")
            self.assertTrue(got.startswith(b"HTTP/1.1 200 "), (empty, got[:200]))
        # a user: API yes, admin routes no
        st, _, backends = api.get("/api/v1/backends", bob)
        self.assertEqual(st, 200)
        self.assertEqual(sorted(b["name"] for b in backends), ["a", "b"])
        for b in backends:
            self.assertEqual(set(b), {"name", "kind", "state", "restarts"})
            self.assertEqual(b["state"], "running")
        for path in ("/metrics", "/status"):
            st, _, body = api.get(path, bob)
            self.assertEqual((st, body["code"]), (403, "EFORBIDDEN"), path)
            st, _, _ = api.get(path)
            self.assertEqual(st, 200, path)
        # the stream takes ?access_token= (EventSource cannot set headers)
        s = api.stream(bob, query_token=True)
        self.assertEqual(s.status, 200, s.head)
        # removing bob stops his token at once, in this running segue, and
        # closes his open stream
        api.user_remove("bob")
        st, _, body = api.get("/api/v1/backends", bob)
        self.assertEqual((st, body["code"]), (401, "EAUTH"))
        self.assertTrue(s.wait_closed(10), "the removed user's stream stayed open")
        # the tokens are stored only as hashes
        db = os.path.join(api.d, "data", "segue.db")
        with open(db, "rb") as f:
            self.assertNotIn(api.admin.encode(), f.read())
        st, _, m = api.get("/metrics")
        self.assertRegex(m, r'segue_api_token_refusals_total\{reason="missing"\} [1-9]')
        self.assertRegex(m, r'segue_api_token_refusals_total\{reason="unknown"\} [1-9]')
        self.assertRegex(m, r'segue_api_token_refusals_total\{reason="not_admin"\} 2')
        self.assertRegex(m, r'segue_api_token_refusals_total\{reason="malformed"\} 1')

    def test_user_cli(self):
        api = Api(self)
        r = subprocess.run([SEGUE, "user", "add", "root", "cfg.lua"],
                           cwd=api.d, capture_output=True, text=True)
        self.assertEqual(r.returncode, 1)
        self.assertIn("exists", r.stderr)
        api.user_add("eve")
        r = subprocess.run([SEGUE, "user", "list", "cfg.lua"],
                           cwd=api.d, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = r.stdout.splitlines()
        self.assertTrue(lines[0].startswith("eve tokens=1"), lines)
        self.assertTrue(lines[1].startswith("root admin tokens=1"), lines)
        self.assertNotIn("sgt_", r.stdout)  # a token is shown once, when made
        r = subprocess.run([SEGUE, "user", "remove", "nobody", "cfg.lua"],
                           cwd=api.d, capture_output=True, text=True)
        self.assertEqual(r.returncode, 1)
        self.assertIn("no user nobody", r.stderr)
        r = subprocess.run([SEGUE, "user", "frobnicate"],
                           cwd=api.d, capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)
        self.assertIn("usage: segue user add NAME [--admin] [CONFIG]", r.stderr)


class Routes(unittest.TestCase):
    def test_rooms_paging_and_unread(self):
        api = Api(self)
        bob, carol = api.user_add("bob"), api.user_add("carol")
        room = api.room_id("a", "#general")
        for i in range(12):
            api.say("a", "#general", "alice", "m%d" % i)
        path = api.messages_path("a", room, limit=100)
        self.assertTrue(wait_for(lambda: len(api.get(path)[2]["messages"]) == 12, 20))
        rooms = {(r["backend"], r["id"]): r for r in api.get("/api/v1/rooms", bob)[2]}
        self.assertEqual(rooms[("a", room)]["unread"], 12)
        self.assertEqual(rooms[("a", room)]["name"], "#general")
        # the bridge copied every message to b's #general
        broom = api.room_id("b", "#general")
        self.assertIn(("b", broom), rooms)
        # pages: oldest first, back with `before`
        st, _, page = api.get(api.messages_path("a", room, limit=5), bob)
        self.assertEqual(st, 200)
        self.assertEqual(texts(page["messages"]), ["m7", "m8", "m9", "m10", "m11"])
        m = page["messages"][0]
        self.assertEqual(m["backend"], "a")
        self.assertEqual(m["recipient"], room)
        self.assertEqual(m["sender"], "alice")
        for k in ("id", "attachments", "create_time", "edit_time"):
            self.assertIn(k, m)
        page2 = api.get(api.messages_path("a", room, limit=5, before=m["id"]), bob)[2]
        self.assertEqual(texts(page2["messages"]), ["m2", "m3", "m4", "m5", "m6"])
        page3 = api.get(api.messages_path("a", room, limit=5, before=page2["messages"][0]["id"]), bob)[2]
        self.assertEqual(texts(page3["messages"]), ["m0", "m1"])
        # reading the newest page marked the room read for bob only
        rooms = {(r["backend"], r["id"]): r for r in api.get("/api/v1/rooms", bob)[2]}
        self.assertEqual(rooms[("a", room)]["unread"], 0)
        rooms = {(r["backend"], r["id"]): r for r in api.get("/api/v1/rooms", carol)[2]}
        self.assertEqual(rooms[("a", room)]["unread"], 12)
        st, _, body = api.get(api.messages_path("a", room, limit="x"))
        self.assertEqual((st, body["code"]), (400, "EINVAL"))

    def test_sending_through_a_bridge_and_bad_bodies(self):
        api = Api(self)
        room, broom = api.room_id("a", "#general"), api.room_id("b", "#general")
        st, _, body = api.post(api.messages_path("a", room), {"text": "hello <b>bridge</b>"})
        self.assertEqual(st, 201, body)
        sent = body["id"]
        # a's log has it as sent; the router copied it to b, as for any message
        self.assertTrue(wait_for(lambda: any(m["id"] == sent for m in api.get(api.messages_path("a", room))[2]["messages"]), 10))
        self.assertTrue(wait_for(lambda: any(plain(m["content"]).endswith("hello <b>bridge</b>")
                                             for m in api.get(api.messages_path("b", broom))[2]["messages"]), 10))
        # a MessageContent body
        content = {"type": "Concat", "value": [{"type": "Bold", "value": {"type": "Text", "value": "big"}},
                                              {"type": "UrlLink", "value": "https://example.org/"}]}
        st, _, body = api.post(api.messages_path("a", room), {"content": content})
        self.assertEqual(st, 201, body)
        self.assertTrue(wait_for(lambda: content in [m["content"] for m in api.get(api.messages_path("a", room))[2]["messages"]], 10))
        # room ids with reserved characters travel percent-encoded
        st, _, body = api.post(api.messages_path("a", "odd/room@x #1"), {"text": "dm"})
        self.assertEqual(st, 201, body)
        msgs = api.get(api.messages_path("a", "odd/room@x #1"))[2]["messages"]
        self.assertEqual([(m["recipient"], plain(m["content"])) for m in msgs], [("odd/room@x #1", "dm")])
        # bad requests
        st, _, body = api.request("POST", api.messages_path("a", room), api.admin, raw_body=b"{not json")
        self.assertEqual((st, body["code"]), (400, "EDECODE"))
        st, _, body = api.post(api.messages_path("a", room), {"txt": 1})
        self.assertEqual((st, body["code"]), (400, "EINVAL"))
        st, _, body = api.post(api.messages_path("a", room), {"content": {"type": "Nope", "value": 1}})
        self.assertEqual(st, 400, body)
        st, _, body = api.post(api.messages_path("zz", room), {"text": "x"})
        self.assertEqual((st, body["code"]), (404, "ENOBACKEND"))
        st, _, body = api.request("DELETE", api.messages_path("a", room), api.admin)
        self.assertEqual((st, body["code"]), (405, "EMETHOD"))
        st, _, body = api.get("/api/v1/nothing")
        self.assertEqual((st, body["code"]), (404, "ENOTFOUND"))
        st, _, body = api.get("/api/v1/rooms/a/%zz/messages")
        self.assertEqual(st, 400)

    def test_status_and_the_web_client(self):
        api = Api(self)
        st, _, status = api.get("/status")
        self.assertEqual(st, 200)
        self.assertEqual(sorted(b["name"] for b in status["backends"]), ["a", "b"])
        self.assertIn("peers", status)
        st, h, page = api.request("GET", "/")
        self.assertEqual(st, 200)
        self.assertIn("text/html", h["content-type"])
        self.assertIn('id="token"', page)
        self.assertIn("script-src 'self'", h["content-security-policy"])
        st, h, js = api.request("GET", "/app.js")
        self.assertEqual(st, 200)
        self.assertIn("javascript", h["content-type"])
        st, _, _ = api.request("GET", "/nothing.js")
        self.assertEqual(st, 404)

    def test_history_falls_back_to_the_backends_message_get_before(self):
        api = Api(self, backends='old = { script = "old_backend.lua" }', rules="return {}",
                  d=self._old_backend_dir())
        # the log has only the announced newest message; older ones come
        # from the backend when the log has nothing before it
        path = api.messages_path("old", "#hist")
        self.assertTrue(wait_for(lambda: len(api.get(path)[2]["messages"]) == 1, 10))
        newest = api.get(path)[2]["messages"][0]
        self.assertEqual(newest["content"]["value"], "old 30")
        page = api.get(api.messages_path("old", "#hist", limit=10, before=newest["id"]))[2]["messages"]
        self.assertEqual(texts(page), ["old %d" % i for i in range(20, 30)])
        page = api.get(api.messages_path("old", "#hist", limit=10, before=page[0]["id"]))[2]["messages"]
        self.assertEqual(texts(page), ["old %d" % i for i in range(10, 20)])

    def _old_backend_dir(self):
        import tempfile
        d = tempfile.mkdtemp(prefix="segue-it-")
        write(os.path.join(d, "old_backend.lua"), OLD_BACKEND)
        return d


# A service with 30 messages from before segue: it announces only the
# newest, and replays 10 older ones per MessageGetBefore.
OLD_BACKEND = r"""
local backend = ...
local msgs = {}
for i = 1, 30 do
  msgs[i] = { id = "h" .. i, sender = "old", recipient = "#hist", attachments = {},
    content = { type = "Text", value = "old " .. i }, create_time = 1000000 + i, edit_time = 1000000 + i }
end
require("segue").timer(100, function() backend:emit { type = "MessageUpsert", value = msgs[30] } end)
return {
  info = { name = "old", version = { 0, 1, 0 } },
  RoomLookup = function(name) return name end,
  RoomJoin = function() return true end,
  MessageGetBefore = function(id)
    local n = tonumber(id:match("^h(%d+)$"))
    if not n then return nil, "no message " .. id end
    for i = math.max(1, n - 10), n - 1 do backend:emit { type = "MessageUpsert", value = msgs[i] } end
    return true
  end,
}
"""


class StreamTests(unittest.TestCase):
    def test_live_events_and_playback_after_disconnect_and_restart(self):
        api = Api(self, http_extra="keepalive_ms = 300")
        room = api.room_id("a", "#general")
        s = api.stream()
        self.assertEqual(s.status, 200)
        self.assertIn("text/event-stream", s.head)
        api.say("a", "#general", "alice", "first")
        evs = s.events(2)  # a's message and its copy in b
        self.assertEqual(len(evs), 2, evs)
        self.assertEqual([e["event"] for e in evs], ["MessageUpsert", "MessageUpsert"])
        by_backend = {e["data"]["backend"]: e for e in evs}
        self.assertEqual(by_backend["a"]["data"]["value"]["content"]["value"], "first")
        self.assertEqual(by_backend["a"]["data"]["value"]["recipient"], room)
        self.assertLess(evs[0]["id"], evs[1]["id"])
        # keep-alive comments while nothing happens
        self.assertIsNone(s.next_event(1.0))
        self.assertTrue(any("keep-alive" in c for c in s.comments), s.comments)
        last = evs[-1]["id"]
        s.close()
        # missed while disconnected
        for t in ("x1", "x2", "x3"):
            api.say("a", "#general", "alice", t)
        self.assertTrue(wait_for(lambda: len(api.get(api.messages_path("b", api.room_id("b", "#general")))[2]["messages"]) == 4, 10))
        s2 = api.stream(last_event_id=last)
        missed = s2.events(6)
        self.assertEqual([e["id"] for e in missed], sorted(e["id"] for e in missed))
        self.assertTrue(all(e["id"] > last for e in missed))
        a_texts = [e["data"]["value"]["content"]["value"] for e in missed if e["data"]["backend"] == "a"]
        self.assertEqual(a_texts, ["x1", "x2", "x3"])
        self.assertEqual(len([e for e in missed if e["data"]["backend"] == "b"]), 3)
        self.assertIsNone(s2.next_event(0.5), "more than the missed events were replayed")
        # then live
        api.say("a", "#general", "alice", "live")
        ev = s2.next_event()
        self.assertEqual(ev["id"], missed[-1]["id"] + 1)
        s2.close()
        # the ids are durable: a restart replays from the store
        api.stop()
        api.start()
        s3 = api.stream(last_event_id=missed[-1]["id"])
        again = s3.events(2)
        self.assertEqual([e["id"] for e in again][:1], [missed[-1]["id"] + 1])
        self.assertEqual(again[0]["data"]["value"]["content"]["value"], "live")
        s3.close()
        st, _, body = api.get("/api/v1/stream", headers={"Last-Event-ID": "nope"})
        self.assertEqual(st, 400)

    def test_many_stream_clients_and_the_limit(self):
        api = Api(self, http_extra="max_streams = 40")
        api.room_id("a", "#general")
        clients = [api.stream() for _ in range(40)]
        self.assertTrue(all(c.status == 200 for c in clients))
        extra = api.stream()
        self.assertEqual(extra.status, 503)
        extra.close()
        api.say("a", "#general", "alice", "to everyone")
        for c in clients:
            ev = c.next_event()
            self.assertIsNotNone(ev)
            self.assertEqual(ev["data"]["value"]["content"]["value"], "to everyone")
        st, _, m = api.get("/metrics")
        self.assertRegex(m, r"segue_api_stream_clients 40")
        for c in clients:
            c.close()


class Limits(unittest.TestCase):
    def test_body_size_header_time_out_and_metrics_format(self):
        api = Api(self, http_extra="max_body_bytes = 2048, header_timeout_ms = 500")
        room = api.room_id("a", "#general")
        st, _, body = api.post(api.messages_path("a", room), {"text": "x" * 4096})
        self.assertEqual((st, body["code"]), (413, "ELIMIT"))
        # a client that never finishes its headers is closed
        s = socket.create_connection(("127.0.0.1", api.port), timeout=10)
        s.sendall(b"GET /api/v1/rooms HTTP/1.1\r\nHost: x\r\n")
        t0 = time.time()
        self.assertEqual(s.recv(100), b"")
        self.assertLess(time.time() - t0, 9)
        s.close()
        # garbage and too many header lines: a JSON error, then the connection closes
        for raw, status in ((b"NOT HTTP AT ALL\r\n\r\n", 400),
                            (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(70)) + b"\r\n", 431)):
            got = raw_exchange(api.port, raw)
            self.assertTrue(got.startswith(b"HTTP/1.1 %d " % status), got)
            self.assertIn(b'"code":"', got)
        # still serving; /metrics passes promtool and counts what happened
        api.post(api.messages_path("a", room), {"text": "counted"})
        self.assertTrue(wait_for(lambda: 'segue_messages_routed_total{bridge="bridge1",outcome="sent"} 1'
                                 in api.get("/metrics")[2], 10), api.get("/metrics")[2])
        st, h, m = api.get("/metrics")
        self.assertIn("text/plain", h["content-type"])
        for family in ("segue_messages_routed_total", "segue_backend_requests_total",
                       "segue_backend_request_duration_seconds_bucket", "segue_backend_restarts_total",
                       "segue_postbox_queue_depth", "segue_postbox_pushes_total", "segue_postbox_pulls_total",
                       "segue_api_token_refusals_total", "segue_rules_loads_total",
                       "segue_rules_load_failures_total", "segue_api_stream_clients"):
            self.assertIn(family, m)
        self.assertRegex(m, r'segue_backend_requests_total\{backend="a",outcome="ok"\} [1-9]')
        self.assertRegex(m, r"segue_rules_loads_total 1")
        promtool = shutil.which("promtool")
        if not promtool:
            self.skipTest("promtool missing: install Debian's prometheus (build.sh deps)")
        r = subprocess.run([promtool, "check", "metrics"], input=m, capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_config_errors(self):
        d = __import__("tempfile").mkdtemp(prefix="segue-it-")
        self.addCleanup(shutil.rmtree, d, True)
        write(os.path.join(d, "cfg.lua"), 'http = { listen = "localhost", max_streams = -1, nope = 1 }\n')
        r = subprocess.run([SEGUE, "check", "cfg.lua"], cwd=d,
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 1)
        self.assertIn("cfg.lua:1: http.listen: expected an IP address and port", r.stderr)
        self.assertIn("http.max_streams: expected a positive integer", r.stderr)
        self.assertIn("http.nope: unknown key", r.stderr)


if __name__ == "__main__":
    unittest.main()
