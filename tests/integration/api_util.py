"""Helpers for the client API tests: a running `segue run` with http.listen,
users made with `segue user add`, and small HTTP and SSE clients."""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse

from harness import SEGUE, LogTail, inject_lua, run, say, tmpdir, wait_for, write



def q(s):
    """A path segment, percent-encoded."""
    return urllib.parse.quote(s, safe="")


class Api:
    """segue with backends a and b (memory), bridged a:#general <-> b:#general."""

    def __init__(self, test, http_extra="", backends=None, rules=None, d=None):
        self.test = test
        self.d = d or tmpdir()
        test.addCleanup(shutil.rmtree, self.d, True)
        self.backends = backends or 'a = { script = "memory" }, b = { script = "memory" }'
        self.rules = rules if rules is not None else 'return { bridge { "a:#general", "b:#general" } }'
        self.http_extra = http_extra
        write(os.path.join(self.d, "inject.lua"), inject_lua())
        write(os.path.join(self.d, "rules.lua"), self.rules)
        write(os.path.join(self.d, "cfg.lua"),
              'data_dir = "data"\nbackends = { %s }\nrules = "rules.lua"\nscripts = { "inject.lua" }\n'
              'http = { listen = "127.0.0.1:0", %s }\n' % (self.backends, http_extra))
        self.p = None
        self.admin = self.user_add("root", admin=True)
        self.start()

    def user_add(self, name, admin=False):
        args = ["user", "add", name] + (["--admin"] if admin else []) + ["cfg.lua"]
        r = run(args, cwd=self.d)
        self.test.assertEqual(r.code, 0, r.stderr)
        m = re.search(r"^token (\S+)$", r.stdout, re.M)
        self.test.assertIsNotNone(m, r.stdout)
        return m.group(1)

    def user_remove(self, name):
        r = run(["user", "remove", name, "cfg.lua"], cwd=self.d)
        self.test.assertEqual(r.code, 0, r.stderr)

    def start(self):
        self.p = subprocess.Popen([SEGUE, "run", "cfg.lua"], cwd=self.d, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        self.test.addCleanup(self.kill)
        self.log = LogTail(self.p)
        self.test.assertTrue(self.log.wait_for("api: listening", 30), self.log.text())
        self.port = int(re.search(r"api: listening on \S+ \(port (\d+)\)", self.log.text()).group(1))
        self.test.assertTrue(self.log.wait_for("running with", 30), self.log.text())

    def _reap(self):
        self.p.wait(20)
        self.log.thread.join(5)
        self.p.stderr.close()

    def kill(self):
        if self.p and self.p.poll() is None:
            self.p.kill()
        if self.p and not self.p.stderr.closed:
            self._reap()

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self._reap()
        self.test.assertEqual(self.p.returncode, 0, self.log.text())

    def say(self, backend, room, sender, text):
        say(self.d, backend, room, sender, text)

    def request(self, method, path, token=None, body=None, headers=None, raw_body=None):
        """(status, headers dict with lower-case names, decoded JSON or text)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        h = dict(headers or {})
        if token:
            h["Authorization"] = "Bearer " + token
        data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            h["Content-Type"] = "application/json"
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        text = r.read().decode()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        c.close()
        if "json" in hdrs.get("content-type", ""):
            return r.status, hdrs, json.loads(text)
        return r.status, hdrs, text

    def get(self, path, token=None, **kw):
        return self.request("GET", path, token or self.admin, **kw)

    def post(self, path, body, token=None, **kw):
        return self.request("POST", path, token or self.admin, body=body, **kw)

    def room_id(self, backend, name, timeout=20):
        """The id of a room the backend announced (RoomUpsert) under `name`."""
        found = {}

        def look():
            _, _, rooms = self.get("/api/v1/rooms")
            for r in rooms:
                if r["backend"] == backend and r["name"] == name:
                    found["id"] = r["id"]
                    return True
            return False
        self.test.assertTrue(wait_for(look, timeout), "room %s:%s never appeared" % (backend, name))
        return found["id"]

    def messages_path(self, backend, room, **query):
        p = "/api/v1/rooms/%s/%s/messages" % (q(backend), q(room))
        return p + ("?" + urllib.parse.urlencode(query) if query else "")

    def stream(self, token=None, last_event_id=None, query_token=False):
        return Stream(self.port, token or self.admin, last_event_id, query_token)


class Stream:
    """An SSE client over a raw socket: events as dicts {id, event, data}."""

    def __init__(self, port, token, last_event_id=None, query_token=False):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        path = "/api/v1/stream"
        headers = ["Host: 127.0.0.1", "Accept: text/event-stream"]
        if query_token:
            path += "?access_token=" + q(token)
        else:
            headers.append("Authorization: Bearer " + token)
        if last_event_id is not None:
            headers.append("Last-Event-ID: %s" % last_event_id)
        self.sock.sendall(("GET %s HTTP/1.1\r\n%s\r\n\r\n" % (path, "\r\n".join(headers))).encode())
        self.buf = b""
        self.closed = False
        head = self._until(b"\r\n\r\n", 20)
        self.status = int(head.split(b" ")[1]) if head else 0
        self.head = head.decode(errors="replace") if head else ""
        self.comments = []

    def _fill(self, deadline):
        self.sock.settimeout(max(0.01, deadline - time.time()))
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return False
        if not chunk:
            self.closed = True
            return False
        self.buf += chunk
        return True

    def _until(self, sep, timeout):
        deadline = time.time() + timeout
        while sep not in self.buf:
            if self.closed or time.time() >= deadline:
                return None
            self._fill(deadline)
        i = self.buf.index(sep)
        out, self.buf = self.buf[:i], self.buf[i + len(sep):]
        return out

    def next_event(self, timeout=20):
        """The next event, or None when none came in time (or the stream closed)."""
        deadline = time.time() + timeout
        while True:
            block = self._until(b"\n\n", max(0.0, deadline - time.time()))
            if block is None:
                return None
            ev = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    self.comments.append(line)
                elif ":" in line:
                    k, v = line.split(":", 1)
                    ev[k] = v[1:] if v.startswith(" ") else v
            if "data" in ev:
                ev["data"] = json.loads(ev["data"])
                ev["id"] = int(ev["id"])
                return ev

    def events(self, n, timeout=20):
        out = []
        deadline = time.time() + timeout
        while len(out) < n:
            ev = self.next_event(max(0.0, deadline - time.time()))
            if ev is None:
                break
            out.append(ev)
        return out

    def wait_closed(self, timeout=10):
        deadline = time.time() + timeout
        while not self.closed and time.time() < deadline:
            self._fill(deadline)
        return self.closed

    def close(self):
        self.sock.close()
