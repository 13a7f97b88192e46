"""Representative integration scenarios under valgrind: no invalid access,
no use of uninitialized memory, no definite leak. Valgrind exits 99 on any
of them, and its report is in the failure message.

Runs only where it means something: valgrind installed and a binary that is
not built with AddressSanitizer (the two do not run together; the Sanitize
build is checked by ASan/LSan in every other test instead). Otherwise the
tests are skipped, with the reason shown."""
import json
import os
import shutil
import signal
import subprocess
import unittest

from harness import FAKE, PRELUDE, PYTHON, SEGUE, tmpdir, write
from test_faults import asan_built

SRC = os.environ.get("SEGUE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
MEMORY = os.path.join(SRC, "backends", "memory.lua")
VALGRIND = ["valgrind", "--error-exitcode=99", "--leak-check=full",
            "--errors-for-leak-kinds=definite", "--track-fds=no", "--quiet"]


def skip_reason():
    if not shutil.which("valgrind"):
        return "valgrind is not installed"
    if os.environ.get("SEGUE_BUILD_TYPE") == "Sanitize" or asan_built():
        return "segue is built with AddressSanitizer (SEGUE_BUILD_TYPE=%s); ASan checks it instead" % (
            os.environ.get("SEGUE_BUILD_TYPE") or "?")
    return None


def under_valgrind(args, stdin=None, cwd=None):
    p = subprocess.run(VALGRIND + [SEGUE] + args, input=stdin, capture_output=True,
                       timeout=600, cwd=cwd)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


@unittest.skipIf(skip_reason(), skip_reason())
class Valgrind(unittest.TestCase):
    def test_exec_with_the_memory_backend_and_a_process_backend(self):
        d = tmpdir()
        script = write(os.path.join(d, "script.lua"), PRELUDE + """
            assert(segue.add_backend("mem", { script = "memory", options = { user = "segue" } }))
            fake("fake", {}, { restart_backoff_ms = 20, request_timeout_ms = 5000 })
            local room = lookup("mem", "#general").body.value
            out(segue.await(function()
              return segue.backend("mem"):request { type = "MessageSend", value = {
                recipient = room, content = { type = "Text", value = "hello" } } }
            end))
            out(lookup("fake", "#ok"))
            out(lookup("fake", "#retry-3"))
            out(lookup("fake", "#crash"))
            out(lookup("fake", "#garbage"))
            out(lookup("fake", "#split"))
        """)
        code, out, err = under_valgrind(["exec", script], cwd=d)
        self.assertEqual(code, 0, err)
        sent, ok, retried, crash, garbage, split = [json.loads(x) for x in out.splitlines()]
        self.assertEqual(sent["type"], "MessageID")
        self.assertEqual(ok["body"]["value"], "!ok")
        self.assertEqual(retried["body"]["value"], "!after-3")
        self.assertEqual((crash["code"], garbage["code"]), ("EDEAD", "EPROTO"))
        self.assertEqual(split["body"]["value"], "!split")

    def test_standalone_backend_on_stdin_and_stdout(self):
        requests = [
            {"sequence_number": 1, "body": {"type": "RoomLookup", "value": "#a"}},
            {"sequence_number": 2, "body": {"type": "MessageGet", "value": "nope"}},
            {"sequence_number": 3, "body": {"type": "RoomJoin", "value": "#a"}},
        ]
        data = "".join(json.dumps(r) + "\n" for r in requests).encode()
        # then a value the strict reader refuses: the session ends with an error
        code, out, err = under_valgrind(["backend", MEMORY, "user=alice"], stdin=data + b"{]\n")
        self.assertEqual(code, 1, err)
        values = [json.loads(x) for x in out.splitlines()]
        answered = sorted(v["sequence_number"] for v in values if "sequence_number" in v)
        self.assertEqual(answered, [1, 2, 3])
        self.assertIn("invalid JSON at byte offset", err)

    def test_run_with_two_backends_stopped_by_sigterm(self):
        d = tmpdir()
        cfg = write(os.path.join(d, "segue.lua"), """
            data_dir = "data"
            backends = { mem = { script = "memory" }, fake = { cmd = %s, args = { %s } } }
        """ % (json.dumps(PYTHON), json.dumps(FAKE)))
        p = subprocess.Popen(VALGRIND + [SEGUE, "run", cfg], cwd=d, stderr=subprocess.PIPE)
        log = b""
        for line in p.stderr:  # until both backends have started
            log += line
            if log.count(b'msg="started: ') == 2:
                break
        p.send_signal(signal.SIGTERM)
        log += p.stderr.read()
        p.stderr.close()
        self.assertEqual(p.wait(600), 0, log.decode(errors="replace"))
        self.assertEqual(log.count(b'msg="stopped: '), 2, log.decode(errors="replace"))


if __name__ == "__main__":
    unittest.main()
