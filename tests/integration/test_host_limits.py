"""Issue 12 (security and overload), the host's half: every attack here is
reproduced against the real segue binary and must leave it running.
docs/hardening.md has the table: attack, defence, what each test measures."""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import unittest

from harness import run, run_lua, tmpdir, write, LogTail, PYTHON, HERE, SEGUE

DEEP = os.path.join(HERE, "deep_backend.py")
STUCK = os.path.join(HERE, "stuck_backend.py")
SANITIZE = os.environ.get("SEGUE_BUILD_TYPE") == "Sanitize"


def deep(depth, extra="max_depth = 300, restart_backoff_ms = 50"):
    return """
        local depths = {}
        segue.on("update", function(name, u)
          local d, x = 0, u.value.extra
          while type(x) == "table" do d, x = d + 1, x.x end
          depths[#depths + 1] = d + 1
        end)
        assert(segue.add_backend("deep", { cmd = %s, args = { %s, "%d" }, %s }))
        out(lookup("deep", "#deep"))
        out(lookup("deep", "#ok"))
        segue.wait(300)
        out({ depths = depths, info = segue.backend("deep"):info() })
    """ % (json.dumps(PYTHON), json.dumps(DEEP), depth, extra)


class DeepValues(unittest.TestCase):
    """Item 1: a backend setting (max_depth = 300) and an Update nested 200
    deep used to abort segue (a raise outside any protected call)."""

    def test_an_update_deeper_than_lua_follows_is_a_violation_not_an_abort(self):
        r = run_lua(deep(200), timeout=60)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertNotIn("PANIC", r.stderr)
        self.assertIn("max_depth 300 capped to 128", r.stderr)
        self.assertIn("nests deeper than 128 levels", r.stderr)
        deep_, lookup, state = r.values()
        self.assertEqual(deep_["code"], "EPROTO", r.stderr)
        self.assertEqual(lookup["body"], {"type": "RoomID", "value": "!ok"}, r.stderr)
        self.assertEqual(state["depths"], [])
        self.assertGreaterEqual(state["info"]["restarts"], 1)

    def test_an_update_as_deep_as_the_cap_arrives_whole(self):
        r = run_lua(deep(120), timeout=60)
        self.assertEqual(r.code, 0, r.stderr)
        deep_, lookup, state = r.values()
        self.assertEqual(deep_["body"]["value"], "!ok", r.stderr)
        self.assertEqual(lookup["body"]["value"], "!ok")
        self.assertEqual(state["depths"], [120])
        self.assertEqual(state["info"]["restarts"], 0)

    def test_no_raw_lua_call_from_c(self):
        # every C->Lua call is protected: lua_pcall, sg__lenv_pcall[_raw]
        import re
        src = os.environ.get("SEGUE_SOURCE_DIR") or os.path.join(HERE, "..", "..")
        raw = re.compile(r"\blua_callk?\s*\(")
        found = []
        for top in ("runtime", "bindings"):
            for d, _, files in os.walk(os.path.join(src, top)):
                for name in files:
                    if name.endswith((".c", ".h")):
                        with open(os.path.join(d, name)) as f:
                            for n, text in enumerate(f, 1):
                                if raw.search(text):
                                    found.append("%s:%d" % (name, n))
        self.assertEqual(found, [])

    def test_json_decode_reports_too_deep_instead_of_raising(self):
        r = run_lua("""
            local v, err = json.decode(("["):rep(200) .. ("]"):rep(200))
            out({ v = v == nil, err = err })
        """)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertEqual(r.values()[0], {"v": True, "err": "JSON nested deeper than 128 levels"})


class Segue:
    """`segue run CONFIG` in its own temporary directory, stopped at exit."""

    def __init__(self, test, d, config="cfg.lua"):
        self.d = d
        self.proc = subprocess.Popen([SEGUE, "run", config], cwd=d, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log = LogTail(self.proc)
        test.addCleanup(self.stop)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class Files(unittest.TestCase):
    """Item 10: `segue reload` signalled whatever pid a stale pid file held;
    a pre-existing data directory kept mode 0777; database files were 0644."""

    def setUp(self):
        self.d = tmpdir()
        self.addCleanup(shutil.rmtree, self.d, True)
        self.data = os.path.join(self.d, "data")
        write(os.path.join(self.d, "cfg.lua"), 'data_dir = "data"\n')

    def test_the_data_directory_is_made_0700_and_files_are_0600(self):
        os.mkdir(self.data)
        os.chmod(self.data, 0o777)
        s = Segue(self, self.d)
        self.assertTrue(s.log.wait_for("running with"), s.log.text())
        self.assertEqual(mode(self.data), 0o700)
        self.assertIn("had mode 777; made it 0700", s.log.text())
        for name in ("segue.db", "segue.pid"):
            self.assertEqual(mode(os.path.join(self.data, name)), 0o600, name)
        with open(os.path.join(self.data, "segue.pid")) as f:
            self.assertEqual(int(f.read()), s.proc.pid)

    def test_reload_refuses_a_stale_pid_file_and_signals_no_one(self):
        s = Segue(self, self.d)
        self.assertTrue(s.log.wait_for("running with"), s.log.text())
        s.proc.kill()  # kill -9: the pid file stays behind
        s.proc.wait(timeout=20)
        victim = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
        self.addCleanup(victim.wait)
        self.addCleanup(victim.kill)
        write(os.path.join(self.data, "segue.pid"), "%d\n" % victim.pid)
        r = run(["reload", "cfg.lua"], cwd=self.d, timeout=30)
        self.assertEqual(r.code, 1, r.stdout + r.stderr)
        self.assertIn("is stale: no process holds its lock", r.stderr)
        self.assertIsNone(victim.poll(), "the process named by the stale pid file got a signal")

    def test_reload_signals_the_running_segue_and_a_second_one_refuses_to_start(self):
        s = Segue(self, self.d)
        self.assertTrue(s.log.wait_for("running with"), s.log.text())
        second = run(["run", "cfg.lua"], cwd=self.d, timeout=30)
        self.assertEqual(second.code, 1)
        self.assertIn("is locked by process %d: another segue runs with this data directory"
                      % s.proc.pid, second.stderr)
        r = run(["reload", "cfg.lua"], cwd=self.d, timeout=30)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertIn("asked segue (pid %d) to reload" % s.proc.pid, r.stdout)
        self.assertTrue(s.log.wait_for("reloaded cfg.lua"), s.log.text())
        self.assertIsNone(s.proc.poll())


FLOOD = """
local function status_kb(field)
  local f = io.open("/proc/self/status")
  local kb = tonumber(f:read("a"):match(field .. ":%%s*(%%d+)"))
  f:close()
  return kb
end
assert(segue.add_backend("stuck", { cmd = %s, args = { %s }, request_timeout_ms = 8000, retry_max_tries = 1 }))
fake("ok", {})
segue.await(function() repeat segue.sleep(20) until segue.backend("stuck"):info().state == "running" end, 20000)
local base_kb = status_kb("VmRSS")
local body = { type = "RoomLookup", value = ("x"):rep(64 * 1024) }
local counts, first_elimit, peak_queued = {}, nil, 0
local sent, max_lag, last = 0, 0, segue.now()
-- a 10 ms ticker: how late the loop runs it is the lag
local ticker = segue.every(10, function()
  local now = segue.now()
  if now - last - 10 > max_lag then max_lag = now - last - 10 end
  last = now
end)
-- 200 requests of 64 KiB a second for 4 s, at a backend that reads nothing
local flood = segue.every(5, function()
  if sent >= 800 then return end
  sent = sent + 1
  local ok, err, code = segue.backend("stuck"):request(body, function(r, err, code)
    counts[code or "ok"] = (counts[code or "ok"] or 0) + 1
  end)
  if not ok then
    counts[code] = (counts[code] or 0) + 1
    first_elimit = first_elimit or err
  end
  local q = segue.backend("stuck"):info().queued_bytes
  if q > peak_queued then peak_queued = q end
end)
local served = lookup("ok", "#ok")
segue.await(function() repeat segue.sleep(50) until sent >= 800 end, 60000)
local peak_kb = status_kb("VmRSS")
segue.await(function() segue.sleep(8500) end, 20000)  -- every accepted request timed out
flood:stop() ticker:stop()
out({ counts = counts, first_elimit = first_elimit, peak_queued = peak_queued,
      queued_after = segue.backend("stuck"):info().queued_bytes, served = served,
      base_kb = base_kb, peak_kb = peak_kb, hwm_kb = status_kb("VmHWM"), max_lag_ms = max_lag })
""" % (json.dumps(PYTHON), json.dumps(STUCK))


class Backpressure(unittest.TestCase):
    """Item 7: a backend that never reads stdin, sent 200 x 64 KiB requests
    a second, made segue grow to 941 MB (the write queue was unbounded and a
    time-out did not free queued bytes)."""

    def test_a_stuck_backend_costs_at_most_its_queue_bound_and_requests_fail_fast(self):
        r = run_lua(FLOOD, timeout=120, env={"ASAN_OPTIONS": "quarantine_size_mb=0"} if SANITIZE else None)
        self.assertEqual(r.code, 0, r.stderr)
        v = r.values()[-1]
        limit = 16 * 1024 * 1024
        print("\nfigures: stuck backend flooded with 800 x 64 KiB: RSS %d -> %d MB (peak %d MB), "
              "loop lag max %d ms, outcomes %s, queued peak %d KiB" % (
                  v["base_kb"] // 1024, v["peak_kb"] // 1024, v["hwm_kb"] // 1024, v["max_lag_ms"],
                  v["counts"], v["peak_queued"] // 1024))
        self.assertGreater(v["counts"].get("ELIMIT", 0), 0, v)
        self.assertIn("ELIMIT: backend stuck's queue is full", v["first_elimit"])
        self.assertIn("max_queue_bytes = 16777216", v["first_elimit"])
        self.assertGreater(v["counts"].get("ETIMEDOUT", 0), 0, v)
        self.assertEqual(sum(v["counts"].values()), 800, v)
        # the bound holds (one 64 KiB request may pass it), and time-outs free
        # what waited: what stays is the one write the pipe holds
        self.assertLessEqual(v["peak_queued"], limit + 80 * 1024)
        self.assertLess(v["queued_after"], 512 * 1024, v)
        self.assertEqual(v["served"]["body"]["value"], "!ok")
        if not SANITIZE:
            self.assertLess(v["hwm_kb"] - v["base_kb"], 150 * 1024, v)


class Sandbox(unittest.TestCase):
    """Item 8: the instruction limit was catchable, work inside one C call
    was not counted, rules had the whole standard library, and a segue busy
    in Lua ignored SIGTERM."""

    def setUp(self):
        self.d = tmpdir()
        self.addCleanup(shutil.rmtree, self.d, True)

    def check(self, config):
        write(os.path.join(self.d, "cfg.lua"), config)
        return run(["check", "cfg.lua"], cwd=self.d, timeout=60)

    def test_a_config_spinning_inside_pcall_is_stopped(self):
        for spin in ("while true do pcall(function() while true do end end) end",
                     "while true do xpcall(function() while true do end end, function() while true do end end) end",
                     "while true do pcall(error, 'x') pcall(function() error('y', 0) end) end",
                     "local function f() pcall(f) end while true do f() end"):
            r = self.check(spin + "\n")
            self.assertEqual(r.code, 1, spin)
            self.assertIn("the config stopped after 1000000 instructions", r.stderr, spin)

    def test_the_config_sandbox_has_no_way_out(self):
        for code, err in (("os.execute('true')", "field 'execute'"),
                          ("io.open('/etc/passwd')", "global 'io'"),
                          ("require('segue.fs')", "global 'require'"),
                          ("load('return 1')", "global 'load'"),
                          ("loadfile('cfg.lua')", "global 'loadfile'"),
                          ("debug.sethook()", "global 'debug'"),
                          ("coroutine.wrap(print)", "global 'coroutine'"),
                          ("string.dump(print)", "field 'dump'"),
                          ("setmetatable({}, { __gc = function() end })", "__gc is not allowed here"),
                          ("getmetatable('').__index.upper = nil", "index a nil value")):
            r = self.check(code + "\n")
            self.assertEqual(r.code, 1, code)
            self.assertIn(err, r.stderr, code)

    def test_a_config_cannot_allocate_past_its_memory_budget_even_inside_pcall(self):
        r = self.check("""
            local s = ("x"):rep(16 * 1024 * 1024)
            pcall(function()
              local t = {}
              for i = 1, 8 do t[i] = s .. i end
            end)
            data_dir = "never"
        """)
        self.assertEqual(r.code, 1, r.stderr)
        self.assertIn("the config used more than its memory budget of 67108864 bytes", r.stderr)

    def test_string_rep_and_pattern_subjects_are_bounded(self):
        for code, err in (("string.rep('x', 1 << 30)",
                           "string.rep: a result of 1073741824 bytes is over the sandbox's limit of 16777216 bytes"),
                          ("local s = ('ab'):rep(1 << 29, ',')",
                           "string.rep: a result of"),
                          ("local s = ('a'):rep(70000) s:find('a*a*a*b')",
                           "string.find: a subject of 70000 bytes is over the sandbox's limit of 65536 bytes"),
                          ("local s = ('a'):rep(70000) s:gsub('.-b', '')",
                           "string.gsub: a subject of 70000")):
            r = self.check(code + "\n")
            self.assertEqual(r.code, 1, code)
            self.assertIn(err, r.stderr, code)
        # plain find is linear: not bounded
        self.assertEqual(self.check("assert(('a'):rep(70000):find('b', 1, true) == nil)\n").code, 0)

    def test_a_spinning_filter_is_stopped_and_segue_keeps_bridging(self):
        from test_router import Bridge
        br = Bridge(self, '''return {
            bridge { "a:#f", "b:#f",
              filter = function(msg, ctx)
                if ctx.text == "spin" then while true do pcall(function() while true do end end) end end
                if ctx.text == "rep" then return ("x"):rep(1 << 30) end
                return true
              end },
        }''', d=self.d)
        for t in ("before", "spin", "rep", "after"):
            br.say("a", "#f", "alice", t)
        self.assertTrue(br.wait_for(lambda: "<alice@a> after" in br.texts("b")))
        self.assertEqual(br.texts("b"), ["<alice@a> before", "<alice@a> after"])
        err = br.stop()
        self.assertIn("rule stopped after 1000000 instructions", err)
        self.assertIn("string.rep: a result of 1073741824 bytes", err)

    def spinning_segue(self, script=None, cfg=None):
        write(os.path.join(self.d, "spin.lua"), script or """
            local segue = require "segue"
            segue.timer(50, function()
              io.stderr:write("spinning\\n")
              while true do pcall(function() while true do end end) end
            end)
        """)
        write(os.path.join(self.d, "cfg.lua"), cfg or 'data_dir = "data"\nscripts = { "spin.lua" }\n')
        s = Segue(self, self.d)
        self.assertTrue(s.log.wait_for("spinning"), s.log.text())
        return s

    def test_sigterm_stops_a_segue_stuck_in_lua(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            s = self.spinning_segue()
            s.proc.send_signal(sig)
            s.proc.wait(timeout=30)
            self.assertEqual(s.proc.returncode, 0, s.log.text())
            self.assertTrue(s.log.wait_for("interrupted by signal %d" % sig), s.log.text())

    def test_sigterm_lets_a_callback_that_ends_by_itself_finish(self):
        # Lua busy for 300 ms when the signal comes (a burst of messages
        # being routed): it ends within the grace, is not cut in the
        # middle, and segue stops cleanly after it.
        s = self.spinning_segue("""
            local segue = require "segue"
            segue.timer(50, function()
              io.stderr:write("spinning\\n")
              local t = os.clock()
              while os.clock() - t < 0.3 do end
              io.stderr:write("finished\\n")
            end)
        """)
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(timeout=30)
        self.assertEqual(s.proc.returncode, 0, s.log.text())
        self.assertTrue(s.log.wait_for("finished"), s.log.text())
        self.assertNotIn("interrupted by signal", s.log.text())

    def test_sigterm_stops_lua_spinning_in_a_coroutine_resumed_from_c(self):
        # segue.net resumes the waiting coroutine from C (not from a pcall):
        # the signal must reach that Lua too.
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        self.addCleanup(srv.close)
        s = self.spinning_segue("""
            local segue = require "segue"
            local net = require "segue.net"
            segue.spawn(function()
              local conn = assert(net.connect("127.0.0.1", %d))
              io.stderr:write("spinning\\n")
              while true do pcall(function() while true do end end) end
            end)
        """ % srv.getsockname()[1])
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(timeout=30)
        self.assertEqual(s.proc.returncode, 0, s.log.text())
        self.assertTrue(s.log.wait_for("interrupted by signal %d" % signal.SIGTERM), s.log.text())

    def sigterm_stops(self, script, cfg=None):
        s = self.spinning_segue(script, cfg)
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(timeout=30)
        self.assertEqual(s.proc.returncode, 0, s.log.text())
        self.assertTrue(s.log.wait_for("interrupted by signal %d" % signal.SIGTERM), s.log.text())

    def test_sigterm_stops_lua_spinning_in_coroutines_resumed_from_lua(self):
        # The count hook is set only on the thread running when the signal
        # comes (docs/performance.md): coroutine.resume/wrap keep track of
        # it, and the caller a coroutine returns to is interrupted too
        # (here it catches the error and would spin on).
        spin = "while true do pcall(function() while true do end end) end"
        for start in ("coroutine.wrap(function() %s end)()" % spin,
                      "assert(coroutine.resume(coroutine.create(function() %s end)))" % spin,
                      "while true do pcall(coroutine.wrap(function() %s end)) end" % spin,
                      "while true do coroutine.resume(coroutine.create(function() "
                      "coroutine.wrap(function() %s end)() end)) end" % spin,
                      "local co = coroutine.wrap(function() while true do coroutine.yield() end end) "
                      "while true do co() end",
                      # to-be-closed variables run by coroutine.close, and by
                      # a wrapped coroutine that died, run on that coroutine
                      "local co = coroutine.create(function() local x <close> = setmetatable({}, "
                      "{ __close = function() %s end }) coroutine.yield() end) "
                      "coroutine.resume(co) coroutine.close(co)" % spin,
                      "coroutine.wrap(function() local x <close> = setmetatable({}, "
                      "{ __close = function() %s end }) error('dies') end)()" % spin):
            self.sigterm_stops("""
                local segue = require "segue"
                segue.timer(50, function()
                  io.stderr:write("spinning\\n")
                  %s
                end)
            """ % start)

    def test_sigterm_stops_a_lua_backend_spinning(self):
        write(os.path.join(self.d, "spinner.lua"), """
            local backend = ...
            backend.timer(50, function()
              io.stderr:write("spinning\\n")
              while true do pcall(function() while true do end end) end
            end)
            return { info = { name = "spinner", version = { 1, 0, 0 } } }
        """)
        self.sigterm_stops(None, 'data_dir = "data"\nbackends = { spin = { script = "%s" } }\n'
                           % os.path.join(self.d, "spinner.lua"))

    def test_no_count_hook_outside_a_sandbox(self):
        # In Lua 5.4 a count hook makes the VM trap every instruction: it is
        # on only inside a sandbox with an instruction limit (or while an
        # interrupt is pending), on the thread that runs it.
        write(os.path.join(self.d, "hooks.lua"), """
            local rules = require "segue.rules"
            local function hook() return (debug.gethook()) ~= nil end
            local co_hook = coroutine.wrap(hook)()
            local ok, inside, co_inside = rules.run(function()
              return hook(), coroutine.wrap(hook)()
            end)
            assert(ok, inside)
            local r = coroutine.wrap(function() return select(2, rules.run(hook)) end)()
            print(hook(), co_hook, inside, co_inside, r, hook())
        """)
        r = run(["exec", "hooks.lua"], cwd=self.d, timeout=60)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertEqual(r.stdout.split(), ["false", "false", "true", "true", "true", "false"])


if __name__ == "__main__":
    unittest.main()
