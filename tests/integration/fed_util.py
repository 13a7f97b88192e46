"""Helpers for the federation tests: segue processes listening for hRPC,
requests with curl and raw sockets, hrpc.v1.Error decoding with protoc."""
import base64
import json
import os
import socket
import subprocess
import time

from harness import SEGUE, run, tmpdir, whole_lines, write, wait_for, free_port  # noqa: F401 (re-exported)

SRC = os.environ.get("SEGUE_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
PROTO = os.path.join(SRC, "proto")

PUSH = "/protocol.sync.v1.PostboxService/Push"
PULL = "/protocol.sync.v1.PostboxService/Pull"
KEY = "/protocol.auth.v1.AuthService/Key"
U64_MAX = 2**64 - 1

# Lua: unsigned decimal of a uint64 held in a (wrapped) Lua integer.
LUA_U64 = """
local function u64(x)
  if x >= 0 then return tostring(x) end
  local q = (x >> 1) // 5
  return tostring(q) .. tostring(x - q * 10)
end
"""

# A segue.on("federation") handler writing each event as a JSON line.
HANDLER = LUA_U64 + """
local segue = require "segue"
local json = require "segue.json"
local path = assert(os.getenv("FED_EVENTS"))
local function plain(t)
  local out = {}
  for k, v in pairs(t) do
    out[k] = type(v) == "table" and plain(v) or (math.type(v) == "integer" and u64(v)) or v
  end
  return out
end
segue.on("federation", function(server_id, event)
  local f = assert(io.open(path, "a"))
  f:write(json.encode { from = server_id, event = plain(event) }, "\\n")
  f:close()
end)
"""



def lua_value(v):
    """A Python value as Lua source (dicts, lists, strings, ints)."""
    if isinstance(v, dict):
        return "{" + ", ".join("[%s] = %s" % (lua_value(k), lua_value(x)) for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "{" + ", ".join(lua_value(x) for x in v) + "}"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class Node:
    """`segue run` with server_id, listen and federation set."""

    def __init__(self, server_id, federation=None, scripts=(), env=None, port=None, nofile=None):
        self.nofile = nofile  # RLIMIT_NOFILE (soft and hard) for the process
        self.dir = tmpdir()
        self.port = port or free_port()
        self.server_id = server_id
        self.url = "http://127.0.0.1:%d" % self.port
        self.events = os.path.join(self.dir, "events.jsonl")
        self.config = write(os.path.join(self.dir, "segue.lua"), "\n".join([
            'data_dir = "./data"',
            'server_id = %s' % json.dumps(server_id),
            'listen = "127.0.0.1:%d"' % self.port,
            'federation = %s' % lua_value(federation or {}),
            'scripts = %s' % lua_value(list(scripts)),
        ]) + "\n")
        self.env = dict(os.environ, FED_EVENTS=self.events, **(env or {}))
        self.proc = None

    def key_file(self):
        return os.path.join(self.dir, "data", "harmony.key")

    def start(self):
        self.log = open(os.path.join(self.dir, "stderr.log"), "wb")
        limit = None
        if self.nofile:
            import resource
            n = self.nofile
            limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))  # noqa: E731
        self.proc = subprocess.Popen([SEGUE, "run", self.config], cwd=self.dir, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=self.log, preexec_fn=limit)
        if not wait_for(lambda: self.healthy() or self.proc.poll() is not None, 20):
            raise AssertionError("segue did not come up")
        if self.proc.poll() is not None:
            raise AssertionError("segue exited: " + self.stderr())
        return self

    def healthy(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                return s.recv(100).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def stop(self):
        """SIGTERM; returns the exit code."""
        if not self.proc:
            return None
        self.proc.terminate()
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        self.proc = None
        return code

    def stderr(self):
        with open(os.path.join(self.dir, "stderr.log"), errors="replace") as f:
            return f.read()

    def read_events(self):
        return [json.loads(line) for line in whole_lines(self.events) if line.strip()]


def curl(url, body=b"", headers=(), method="POST", content_type="application/hrpc"):
    """(status, headers text, body bytes) of one request made by curl."""
    d = tmpdir()
    bodyf, outf, hdrf = (os.path.join(d, n) for n in ("in", "out", "hdr"))
    with open(bodyf, "wb") as f:
        f.write(body)
    args = ["curl", "-s", "-o", outf, "-D", hdrf, "-w", "%{http_code}", "-X", method]
    if content_type:
        args += ["-H", "Content-Type: " + content_type]
    for h in headers:
        args += ["-H", h]
    if method == "POST":
        args += ["--data-binary", "@" + bodyf]
    p = subprocess.run(args + [url], capture_output=True, timeout=60)
    with open(outf, "rb") as f:
        out = f.read()
    with open(hdrf, errors="replace") as f:
        hdr = f.read()
    return int(p.stdout.decode() or 0), hdr, out


def decode(type_name, data, proto="hrpc/v1/hrpc.proto"):
    """protoc --decode: the message as protobuf text format (an independent decoder)."""
    p = subprocess.run(["protoc", "--decode=" + type_name, "-I", PROTO, proto], input=data,
                       capture_output=True, timeout=60)
    if p.returncode != 0:
        raise AssertionError("protoc: " + p.stderr.decode())
    return p.stdout.decode()


def error_fields(data):
    """identifier and human_message of an hrpc.v1.Error body (details as
    bytes: protoc writes them with octal escapes, which are not JSON)."""
    fields = {}
    for line in decode("hrpc.v1.Error", data).splitlines():
        k, _, v = line.partition(": ")
        if k.strip() == "details":
            fields["details"] = v.strip()[1:-1].encode().decode("unicode_escape").encode("latin-1")
        else:
            fields[k.strip()] = json.loads(v)
    return fields


def raw_exchange(port, data, wait=10.0):
    """Sends raw bytes; returns (everything read, closed): closed is True when
    the server closed the connection, False when `wait` seconds passed
    without data."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        got = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return got, True
                got += chunk
        except socket.timeout:
            return got, False
        except ConnectionResetError:
            return got, True


def lua_json(code, timeout=60):
    """Runs a `segue exec` script that prints one JSON value; returns it."""
    d = tmpdir()
    path = write(os.path.join(d, "s.lua"), 'local json = require "segue.json"\n' + code)
    r = run(["exec", path], cwd=d, timeout=timeout)
    if r.code != 0:
        raise AssertionError("segue exec failed (%d): %s" % (r.code, r.stderr))
    return json.loads(r.stdout.strip().splitlines()[-1])


def b64(data):
    return base64.b64encode(data).decode()


def varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def sign(key_file, data):
    """Ed25519 signature of `data` with the seed in a segue key file, made by
    openssl (an implementation independent of segue's libsodium)."""
    with open(key_file, "rb") as f:
        seed = f.read()[:32]
    d = tmpdir()
    der = bytes.fromhex("302e020100300506032b657004220420") + seed
    pem = "-----BEGIN PRIVATE KEY-----\n%s\n-----END PRIVATE KEY-----\n" % base64.b64encode(der).decode()
    write(os.path.join(d, "k.pem"), pem)
    with open(os.path.join(d, "data"), "wb") as f:
        f.write(data)
    subprocess.run(["openssl", "pkeyutl", "-sign", "-inkey", os.path.join(d, "k.pem"), "-rawin",
                    "-in", os.path.join(d, "data"), "-out", os.path.join(d, "sig")],
                   check=True, capture_output=True, timeout=60)
    with open(os.path.join(d, "sig"), "rb") as f:
        return f.read()


def craft_token(key_file, server_id, t, audience=None):
    """A token with AuthData fields as raw bytes (server_id may hold a NUL;
    audience is segue's extension, field 1000), signed with the key file's
    key: standard base64."""
    sid = server_id.encode() if isinstance(server_id, str) else server_id
    data = b"\x0a" + varint(len(sid)) + sid + b"\x10" + varint(t)
    if audience is not None:
        aud = audience.encode()
        data += varint((1000 << 3) | 2) + varint(len(aud)) + aud
    sig = sign(key_file, data)
    tok = b"\x0a" + varint(len(sig)) + sig + b"\x12" + varint(len(data)) + data
    return base64.b64encode(tok).decode()


def push_body(user_id, guild_id=7):
    """PushRequest{event{user_added_to_guild{user_id, guild_id}}}."""
    inner = b"\x08" + varint(user_id) + b"\x10" + varint(guild_id)
    event = b"\x12" + varint(len(inner)) + inner
    return b"\x0a" + varint(len(event)) + event


def notify_body(new_id):
    """NotifyNewIdRequest{new_server_id}."""
    b = new_id.encode()
    return b"\x0a" + varint(len(b)) + b
