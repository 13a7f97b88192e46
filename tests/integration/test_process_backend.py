"""Subprocess backends through the real segue binary: framing, time-outs,
retries, crashes, restarts and protocol violations."""
import json
import os
import re
import unittest

from harness import run_lua, tmpdir, PYTHON, FAKE

FAST = "restart_backoff_ms = 50, request_timeout_ms = 5000"


class Framing(unittest.TestCase):
    def test_split_pretty_and_back_to_back_values_are_read(self):
        r = run_lua("""
            local updates = {}
            segue.on("update", function(name, u) updates[#updates + 1] = u end)
            fake("fake", { "--init=split" })
            for _, room in ipairs { "#ok", "#split", "#pretty", "#twice" } do out(lookup("fake", room)) end
            segue.wait(100)
            out(updates)
        """)
        self.assertEqual(r.code, 0, r.stderr)
        v = r.values()
        self.assertEqual([x["body"] for x in v[:4]],
                         [{"type": "RoomID", "value": "!" + n} for n in ("ok", "split", "pretty", "twice")])
        self.assertEqual(v[4], [{"type": "RoomDelete", "value": "!gone"}])

    def test_pretty_printed_init_info_is_accepted(self):
        r = run_lua('fake("fake", { "--init=pretty" }) out(lookup("fake", "#ok"))')
        self.assertEqual(r.values()[0]["body"], {"type": "RoomID", "value": "!ok"}, r.stderr)
        self.assertIn("started: fake 1.2.3", r.stderr)


class Requests(unittest.TestCase):
    def test_a_request_times_out_and_the_backend_keeps_running(self):
        # The time-out also bounds the answer to "#ok": 300 ms was missed by
        # a Python child on a loaded machine under ASan; 3 s is not.
        r = run_lua("""
            fake("fake", {}, { request_timeout_ms = 3000 })
            out(lookup("fake", "#slow"))
            out(lookup("fake", "#ok"))
            out(segue.backend("fake"):info())
        """)
        slow, ok, info = r.values()
        self.assertEqual(slow["code"], "ETIMEDOUT")
        self.assertIn("RoomLookup request to backend fake timed out after 3000 ms", slow["err"])
        self.assertEqual(ok.get("body", {}).get("value"), "!ok", ok)
        self.assertEqual(info["restarts"], 0)

    def test_a_retryable_error_is_retried_until_it_succeeds(self):
        r = run_lua('fake("fake", {}, { retry_backoff_ms = 10 }) out(lookup("fake", "#retry-4"))')
        self.assertEqual(r.values()[0]["body"], {"type": "RoomID", "value": "!after-4"}, r.stderr)

    def test_a_retryable_error_gives_up_after_ten_tries(self):
        r = run_lua('fake("fake", {}, { retry_backoff_ms = 1 }) out(lookup("fake", "#retry-50"))')
        v = r.values()[0]
        self.assertEqual(v["code"], "EBACKEND")
        self.assertIn("busy, try 10", v["err"])
        self.assertIn("still failing after retries", v["err"])

    def test_a_plain_error_is_not_retried(self):
        r = run_lua('fake("fake", {}) out(lookup("fake", "#fail"))')
        v = r.values()[0]
        self.assertEqual(v["code"], "EBACKEND")
        self.assertIn("no such room", v["err"])

    def test_a_response_to_a_sequence_number_not_in_flight_is_ignored(self):
        r = run_lua('fake("fake", {}) out(lookup("fake", "#unknownseq"))')
        self.assertEqual(r.values()[0]["body"]["value"], "!unknownseq")
        self.assertRegex(r.stderr, r"level=warn backend=fake msg=\"ignoring a RoomID response to sequence number \d+")

    def test_environment_env_file_and_cwd_reach_the_child(self):
        d = tmpdir()
        r = run_lua("""
            fake("a", {}, { env = { FAKE_VAR = "from-env" } })
            fake("b", {}, { env_file = "vars.env", cwd = %s })
            out(lookup("a", "#env")) out(lookup("b", "#env")) out(lookup("b", "#cwd"))
        """ % json.dumps(d), cwd=None)
        # the env file is relative to the working directory of the script
        self.assertNotEqual(r.code, 0)  # vars.env does not exist yet: a clear error
        self.assertIn("cannot read env file", r.stderr)
        with open(os.path.join(d, "vars.env"), "w") as f:
            f.write("# comment\nexport FAKE_VAR=\"from-file\"\n")
        r = run_lua("""
            fake("a", {}, { env = { FAKE_VAR = "from-env" } })
            fake("b", {}, { env_file = %s, cwd = %s })
            out(lookup("a", "#env")) out(lookup("b", "#env")) out(lookup("b", "#cwd"))
        """ % (json.dumps(os.path.join(d, "vars.env")), json.dumps(d)))
        a, b, cwd = [x["body"]["value"] for x in r.values()]
        self.assertEqual((a, b), ("from-env", "from-file"), r.stderr)
        self.assertEqual(os.path.realpath(cwd), os.path.realpath(d))

    def test_stderr_lines_are_logged_with_the_backend_name(self):
        r = run_lua('fake("fake", { "--stderr=hello there" }) out(lookup("fake", "#ok"))')
        self.assertIn('backend=fake stream=stderr msg="hello there"', r.stderr)


class Failures(unittest.TestCase):
    def test_a_crash_fails_the_request_and_the_backend_is_restarted(self):
        state = os.path.join(tmpdir(), "starts")
        r = run_lua("""
            fake("fake", { "--state=%s" }, { %s })
            out(lookup("fake", "#crash"))
            out(lookup("fake", "#ok"))
            out(segue.backend("fake"):info())
        """ % (state, FAST))
        crash, ok, info = r.values()
        self.assertEqual(crash["code"], "EDEAD")
        self.assertIn("exited with status 3", crash["err"])
        self.assertEqual(ok["body"]["value"], "!ok")
        self.assertEqual(info["restarts"], 1)
        with open(state) as f:
            self.assertEqual(f.read(), "start\nstart\n")
        self.assertIn("restarting in 50 ms", r.stderr)

    def test_garbage_on_stdout_is_a_violation_with_its_byte_offset(self):
        r = run_lua('fake("fake", {}, { %s }) out(lookup("fake", "#garbage")) out(lookup("fake", "#ok"))' % FAST)
        bad, ok = r.values()
        self.assertEqual(bad["code"], "EPROTO")
        init_len = len(json.dumps({"backend_name": "fake", "backend_version": [1, 2, 3],
                                   "protocol_version": [0, 1, 0]})) + 1
        # the garbage is "\n  xyz garbage\n": 'x' is 3 bytes in
        self.assertRegex(r.stderr, r"level=error backend=fake msg=\"protocol violation: .*byte offset %d" % (init_len + 3))
        self.assertEqual(ok["body"]["value"], "!ok")

    def test_invalid_json_is_a_violation_with_its_byte_offset(self):
        r = run_lua('fake("fake", {}, { %s }) out(lookup("fake", "#badjson"))' % FAST)
        self.assertEqual(r.values()[0]["code"], "EPROTO")
        init_len = len(json.dumps({"backend_name": "fake", "backend_version": [1, 2, 3],
                                   "protocol_version": [0, 1, 0]})) + 1
        # the missing ':' after "value" is found at the string "x" that follows
        bad = '{"sequence_number": 1, "body": {"type": "RoomID", "value" "x"}}'
        self.assertIn("protocol violation: invalid JSON at byte offset %d" % (init_len + bad.index('"x"')),
                      r.stderr)

    def test_a_response_of_the_wrong_variant_is_a_violation(self):
        r = run_lua('fake("fake", {}, { %s }) out(lookup("fake", "#wrong")) out(lookup("fake", "#ok"))' % FAST)
        bad, ok = r.values()
        self.assertEqual(bad["code"], "EPROTO")
        self.assertIn("with Room, expected RoomID", bad["err"])
        self.assertEqual(ok["body"]["value"], "!ok")

    def test_a_wrong_protocol_version_is_refused_and_the_backend_given_up(self):
        r = run_lua("""
            fake("fake", { "--init=bad" }, { restart_backoff_ms = 10, restart_max_doublings = 3 })
            -- bounded, not timed: each restart starts Python again (slow on a loaded machine)
            segue.await(function()
              while segue.backend("fake"):info().state ~= "failed" do segue.sleep(20) end
            end, 30000)
            out(segue.backend("fake"):info())
            out(lookup("fake", "#ok"))
        """)
        info, req = r.values()
        self.assertEqual(info["state"], "failed", r.stderr)
        self.assertEqual(info["restarts"], 3)
        self.assertEqual(req["code"], "EDEAD")
        self.assertIn("InitInfo.protocol_version", r.stderr)
        self.assertIn("giving up after 3 restarts", r.stderr)

    def test_a_backend_without_init_info_times_out(self):
        r = run_lua("""
            fake("fake", { "--init=late" }, { init_timeout_ms = 200, restart_backoff_ms = 10000 })
            segue.wait(600)
            out(segue.backend("fake"):info())
        """)
        self.assertIn("no InitInfo within 200 ms", r.stderr)
        self.assertEqual(r.values()[0]["state"], "backoff")


if __name__ == "__main__":
    unittest.main()
