"""Helpers for the integration tests: they run the real `segue` binary (path
in $SEGUE, set by ctest) over real pipes and sockets."""
import json
import atexit
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

SEGUE = os.environ.get("SEGUE") or os.path.join(
    os.environ.get("SEGUE_BINARY_DIR", "build"), "segue")
HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "fake_backend.py")
PYTHON = sys.executable

# Lua prelude for scripts: a fake backend definition and a JSON printer.
PRELUDE = """
local segue = require "segue"
local json = require "segue.json"
local function out(v) io.stdout:write(json.encode(v), "\\n") io.stdout:flush() end
local function fake(name, args, extra)
  local def = { cmd = %s, args = { %s } }
  for _, a in ipairs(args or {}) do def.args[#def.args + 1] = a end
  for k, v in pairs(extra or {}) do def[k] = v end
  assert(segue.add_backend(name, def))
end
local function lookup(name, room)
  return segue.await(function()
    local r, err, code = segue.backend(name):request { type = "RoomLookup", value = room }
    return { body = r, err = err, code = code }
  end, 60000)
end
""" % (json.dumps(PYTHON), json.dumps(FAKE))


class Run:
    def __init__(self, proc, stdout, stderr):
        self.code = proc.returncode
        self.stdout = stdout
        self.stderr = stderr

    def values(self):
        """Every stdout line that is JSON, decoded."""
        vals = []
        for line in self.stdout.splitlines():
            try:
                vals.append(json.loads(line))
            except ValueError:
                pass
        return vals


_made = []


def _remove_made():
    for d in _made:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_remove_made)


def tmpdir():
    """A temporary directory, removed when the test process exits."""
    d = tempfile.mkdtemp(prefix="segue-it-")
    _made.append(d)
    return d


def run(args, input=None, timeout=120, cwd=None, env=None):
    e = dict(os.environ)
    if env:
        e.update(env)
    p = subprocess.run([SEGUE] + args, input=input, capture_output=True, timeout=timeout,
                       cwd=cwd, env=e)
    return Run(p, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))


def run_lua(code, timeout=120, cwd=None, env=None, args=()):
    d = tmpdir()
    path = os.path.join(d, "script.lua")
    with open(path, "w") as f:
        f.write(PRELUDE + code)
    return run(["exec", path] + list(args), timeout=timeout, cwd=cwd or d, env=env)


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def whole_lines(path):
    """The complete lines of a file another process appends to, [] when it
    does not exist. One read to the end, then the last piece dropped unless
    it ends in a newline: iterating the file instead can meet its end in the
    middle of a line being written, and the next iteration then hands back
    the rest of that line as a line of its own."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return [l + "\n" for l in text.split("\n")[:-1]]


def live_processes(*markers):
    """How many live (not zombie) processes have every one of `markers` in
    their command line."""
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open("/proc/%s/stat" % pid) as f:
                if f.read().split(") ")[-1].startswith("Z"):
                    continue
        except OSError:
            continue
        if all(m in cmd for m in markers):
            n += 1
    return n


def wait_for(pred, timeout=10.0):
    """Polls pred until it is true (returns True) or the time is up (False)."""
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


class LogTail:
    """Collects a process's stderr in the background, so a test can wait for
    a log line while the process runs (stderr must be a text pipe)."""

    def __init__(self, proc):
        self.lines = []
        self.thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line)

    def text(self):
        return "".join(self.lines)

    def wait_for(self, needle, timeout=20.0):
        return wait_for(lambda: needle in self.text(), timeout)


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now, chosen
    below the kernel's ephemeral range: a port from that range (what bind to
    port 0 hands out) can be taken by any outgoing connection of another
    test (a database client, curl) between this check and the server's own
    bind, which failed test_scaling once with EADDRINUSE."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(max(1024, low - 22000), low - 1)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        return port
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# A script for memory backends: each line {"backend", "room", "sender",
# "text"} appended to DIR/inject.jsonl (say()) is said by that user in that
# room (by name). With only_running, a line waits until its backend runs on
# this instance (several instances on one store: the lease holder says it).
def inject_lua(only_running=False):
    wait = """
      local info = segue.backend(c.backend):info()
      if not (info and info.state == "running") then break end  -- not running here""" if only_running else ""
    return r"""
local segue = require "segue"
local sdk = require "segue.backend_sdk"
local done = 0
segue.every(20, function()
  local f = io.open("inject.jsonl")
  if not f then return end
  local n = 0
  for line in f:lines() do
    n = n + 1
    if n > done then
      local c = segue.json.decode(line)""" + wait + r"""
      done = n
      local room = segue.backend(c.backend):request { type = "RoomLookup", value = c.room }
      sdk.api(c.backend).post(room.value, c.sender, c.text)
    end
  end
  f:close()
end)
"""


def say(d, backend, room, sender, text):
    """Has inject_lua() in directory d say text."""
    with open(os.path.join(d, "inject.jsonl"), "a") as f:
        f.write(json.dumps({"backend": backend, "room": room, "sender": sender, "text": text}) + "\n")
