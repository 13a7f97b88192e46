"""segue.net from Lua scripts in the real binary against Python servers over
real sockets: lines split across writes, the line limit, time-outs, DNS
failures, both calling styles, backpressure, and TLS with and without
certificate verification."""
import json
import os
import socket
import subprocess
import threading
import time
import unittest

from harness import SEGUE, run_lua, tmpdir
from irc_server import make_cert, tls_wrap_server

NET = 'local net = require "segue.net"\n'


class Server:
    """Accepts connections on a loopback port; `handler(conn)` serves each
    one in a thread. `tls` = (cert, key) wraps them in TLS."""

    def __init__(self, handler, tls=None, backlog=5, accept=True):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.handler, self.tls = handler, tls
        self.received = b""
        if accept:
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        try:
            if self.tls:
                conn = tls_wrap_server(conn, *self.tls)
            self.handler(self, conn)
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def read_all(self, conn, n):
        while len(self.received) < n:
            data = conn.recv(65536)
            if not data:
                break
            self.received += data

    def close(self):
        self.sock.close()


def trickle(server, conn):
    for piece in (b"hel", b"lo\r\nwor", b"ld\nsecond", b" half\n", b"unterminated"):
        conn.sendall(piece)
        time.sleep(0.05)


class Plain(unittest.TestCase):
    def serve(self, handler, **kw):
        s = Server(handler, **kw)
        self.addCleanup(s.close)
        return s

    def test_lines_split_across_writes_are_reassembled(self):
        s = self.serve(trickle)
        r = run_lua(NET + """
            out(segue.await(function()
              local c = assert(net.connect("127.0.0.1", %d))
              local lines = {}
              while true do
                local line, err, code = c:read_line()
                if not line then lines[#lines + 1] = code break end
                lines[#lines + 1] = line
              end
              c:close()
              return lines
            end))
        """ % s.port)
        self.assertEqual(r.values(), [["hello", "world", "second half", "unterminated", "EOF"]], r.stderr)

    def test_a_line_over_the_maximum_is_an_error(self):
        s = self.serve(lambda srv, c: (c.sendall(b"short\n" + b"x" * 5000 + b"\n"), time.sleep(0.5)))
        r = run_lua(NET + """
            out(segue.await(function()
              local c = assert(net.connect("127.0.0.1", %d, { max_line = 1000 }))
              local first = c:read_line()
              local line, err, code = c:read_line()
              local again, _, code2 = c:read_line()
              return { first, line == nil, err, code, code2 }
            end))
        """ % s.port)
        first, failed, err, code, code2 = r.values()[0]
        self.assertEqual((first, failed, code, code2), ("short", True, "ELIMIT", "ELIMIT"), r.stderr)
        self.assertIn("longer than 1000 bytes", err)

    def test_writes_are_queued_and_drain_reports_an_empty_queue(self):
        size = 8 * 1024 * 1024

        def slow_reader(srv, conn):
            time.sleep(0.5)  # let the client's queue fill first
            srv.read_all(conn, size)
            conn.sendall(b"got %d\n" % len(srv.received))

        s = self.serve(slow_reader)
        r = run_lua(NET + """
            out(segue.await(function()
              local c = assert(net.connect("127.0.0.1", %d))
              local ok, queued = c:write(string.rep("z", %d))
              local drained = c:drain()
              local after = c:write_queue_size()
              return { ok, queued > 0, drained, after, c:read_line() }
            end, 30000))
        """ % (s.port, size))
        self.assertEqual(r.values(), [[True, True, True, 0, "got %d" % size]], r.stderr)

    def test_callback_style_gets_each_result_later(self):
        s = self.serve(trickle)
        r = run_lua(NET + """
            local got = {}
            local immediate = net.connect("127.0.0.1", %d, {}, function(c, err)
              got[#got + 1] = "connected"
              c:read_line(function(line)
                got[#got + 1] = line
                got[#got + 1] = tostring(c:read_line(function(l2) got[#got + 1] = l2 c:close() end))
              end)
            end)
            got[#got + 1] = tostring(immediate)
            segue.wait(500)
            out(got)
        """ % s.port)
        self.assertEqual(r.values(), [["true", "connected", "hello", "true", "world"]], r.stderr)

    def test_a_refused_connection_is_an_error_value(self):
        port = Server(lambda *a: None, accept=False)
        port.close()
        r = run_lua(NET + """
            local c, err, code = segue.await(function() return net.connect("127.0.0.1", %d) end)
            out({ failed = c == nil, err = err, code = code })
        """ % port.port)
        v = r.values()[0]
        self.assertTrue(v["failed"], r.stderr)
        self.assertEqual(v["code"], "ECONNREFUSED")
        self.assertIn("cannot connect to 127.0.0.1:%d" % port.port, v["err"])

    def test_connecting_times_out_when_the_peer_never_answers(self):
        # A full accept queue: the kernel drops further SYNs.
        s = self.serve(None, backlog=0, accept=False)
        fill = []
        for _ in range(3):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", s.port))
            fill.append(f)
        self.addCleanup(lambda: [f.close() for f in fill])
        time.sleep(0.2)
        r = run_lua(NET + """
            local t0 = segue.now()
            local c, err, code = segue.await(function() return net.connect("127.0.0.1", %d, { timeout_ms = 300 }) end)
            out({ c == nil, err, code, segue.now() - t0 })
        """ % s.port)
        failed, err, code, ms = r.values()[0]
        self.assertTrue(failed, r.stderr)
        self.assertEqual(code, "ETIMEDOUT")
        self.assertIn("timed out after 300 ms", err)
        self.assertLess(ms, 3000)

    def test_an_unknown_host_is_a_dns_error(self):
        r = run_lua(NET + """
            local c, err, code = segue.await(function() return net.connect("no-such-host.invalid", 80) end)
            out({ failed = c == nil, err = err, code = code })
        """)
        v = r.values()[0]
        self.assertTrue(v["failed"], r.stderr)
        self.assertTrue(v["code"].startswith("EAI_"), v)
        self.assertIn("cannot resolve no-such-host.invalid:80", v["err"])

    def test_waiting_without_a_callback_outside_a_coroutine_is_a_programmer_error(self):
        s = self.serve(trickle)
        r = run_lua(NET + 'net.connect("127.0.0.1", %d)' % s.port)
        self.assertNotEqual(r.code, 0)
        self.assertIn("connect without a callback must run inside a coroutine", r.stderr)

    def test_closing_wakes_a_waiting_reader_with_ecanceled(self):
        # The server holds the connection, silent, until segue closes it.
        s = self.serve(lambda srv, c: c.recv(1))
        r = run_lua(NET + """
            local c
            local result
            segue.spawn(function()
              c = assert(net.connect("127.0.0.1", %d))
              local line, err, code = c:read_line()
              result = { line = line, err = err, code = code }
            end)
            -- c is set just before read_line waits: connected and reading
            segue.await(function() while not c do segue.sleep(10) end end, 30000)
            c:close()
            segue.await(function() while not result do segue.sleep(10) end end, 30000)
            out(result)
        """ % s.port)
        self.assertEqual(r.values()[0]["code"], "ECANCELED", r.stderr)


class Tls(unittest.TestCase):
    def setUp(self):
        self.cert, self.key = make_cert(tmpdir(), "localhost")

    def serve_tls(self):
        def greet(srv, conn):
            conn.sendall(b"hello over tls\n")
            srv.read_all(conn, 5)
            conn.sendall(b"echo " + srv.received + b"\n")
            time.sleep(0.2)
        s = Server(greet, tls=(self.cert, self.key))
        self.addCleanup(s.close)
        return s

    SCRIPT = NET + """
        out(segue.await(function()
          local c, err, code = net.connect("localhost", %d, %s)
          if not c then return { err = err, code = code } end
          local first = c:read_line()
          c:write("ping\\n")
          return { first, c:read_line() }
        end))
    """

    def test_a_self_signed_server_is_refused_while_verification_is_on(self):
        s = self.serve_tls()
        r = run_lua(self.SCRIPT % (s.port, "{ tls = true }"))
        v = r.values()[0]
        self.assertEqual(v["code"], "EAUTH", r.stderr)
        self.assertIn("certificate verify failed", v["err"])

    def test_verify_false_talks_to_a_self_signed_server(self):
        s = self.serve_tls()
        r = run_lua(self.SCRIPT % (s.port, "{ tls = true, verify = false }"))
        self.assertEqual(r.values()[0], ["hello over tls", "echo ping"], r.stderr)

    def test_a_trusted_certificate_verifies_and_its_name_is_checked(self):
        s = self.serve_tls()
        env = {"SSL_CERT_FILE": self.cert}  # OpenSSL's default store: trust this one
        ok = run_lua(self.SCRIPT % (s.port, "{ tls = true }"), env=env)
        self.assertEqual(ok.values()[0], ["hello over tls", "echo ping"], ok.stderr)
        wrong = run_lua(self.SCRIPT % (s.port, '{ tls = true, servername = "other.example" }'), env=env)
        v = wrong.values()[0]
        self.assertEqual(v["code"], "EAUTH", wrong.stderr)
        self.assertIn("hostname mismatch", v["err"])


class StartTls(unittest.TestCase):
    """conn:starttls(): a plain connection upgraded in place, as XMPP, SMTP
    and IMAP do: verified by default, a CA file or a pinned certificate for
    self-hosted servers, and no plaintext smuggled in ahead of TLS."""

    def setUp(self):
        d = tmpdir()
        self.cert, self.key = make_cert(d, "localhost")
        self.addCleanup(lambda: [os.remove(os.path.join(d, f)) for f in os.listdir(d)] and os.rmdir(d))
        import hashlib
        import ssl
        with open(self.cert) as f:
            self.fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(f.read())).hexdigest()

    def serve(self, inject=b""):
        def upgrade(srv, conn):
            conn.sendall(b"hello in plain text\n")
            line = b""
            while not line.endswith(b"\n"):
                data = conn.recv(1)
                if not data:
                    return
                line += data
            if line != b"STARTTLS\n":
                return
            conn.sendall(b"go ahead\n" + inject)
            try:
                tls = tls_wrap_server(conn, self.cert, self.key)
            except (OSError, ValueError):
                return
            tls.sendall(b"secret over tls\n")
            srv.received = tls.recv(100)
            tls.sendall(b"got " + srv.received)
            time.sleep(0.2)
        s = Server(upgrade)
        self.addCleanup(s.close)
        return s

    SCRIPT = NET + """
        out(segue.await(function()
          local c = assert(net.connect("localhost", %d))
          local got = { c:read_line() }
          c:write("STARTTLS\\n")
          got[#got + 1] = c:read_line()
          local ok, err, code = c:starttls(%s)
          if not ok then return { got = got, err = err, code = code, closed = c:is_closed() } end
          got[#got + 1] = c:read_line()
          c:write("ping\\n")
          got[#got + 1] = c:read_line()
          c:close()
          return { got = got }
        end, 20000))
    """

    def test_starttls_with_a_trusted_ca_file_upgrades_the_connection(self):
        s = self.serve()
        r = run_lua(self.SCRIPT % (s.port, '{ ca_file = "%s" }' % self.cert))
        self.assertEqual(r.values()[0], {"got": ["hello in plain text", "go ahead", "secret over tls", "got ping"]},
                         r.stderr)
        self.assertEqual(s.received, b"ping\n")

    def test_starttls_verifies_by_default_and_refuses_a_self_signed_server(self):
        s = self.serve()
        r = run_lua(self.SCRIPT % (s.port, ""))
        v = r.values()[0]
        self.assertEqual(v["code"], "EAUTH", r.stderr)
        self.assertIn("certificate verify failed", v["err"])
        self.assertTrue(v["closed"])

    def test_starttls_checks_the_name_against_the_ca_file_certificate(self):
        s = self.serve()
        r = run_lua(self.SCRIPT % (s.port, '{ ca_file = "%s", servername = "other.example" }' % self.cert))
        v = r.values()[0]
        self.assertEqual(v["code"], "EAUTH", r.stderr)
        self.assertIn("hostname mismatch", v["err"])

    def test_a_pinned_certificate_is_accepted_and_any_other_refused(self):
        s = self.serve()
        fp = ":".join(self.fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
        ok = run_lua(self.SCRIPT % (s.port, '{ pin = "%s" }' % fp))
        self.assertEqual(ok.values()[0]["got"][-1], "got ping", ok.stderr)
        s2 = self.serve()
        bad = run_lua(self.SCRIPT % (s2.port, '{ pin = "%s" }' % ("00" * 32)))
        v = bad.values()[0]
        self.assertEqual(v["code"], "EAUTH", bad.stderr)
        self.assertIn("does not match the pin", v["err"])

    def test_plaintext_sent_ahead_of_the_handshake_is_refused(self):
        s = self.serve(inject=b"FORGED: you are admin\n")
        r = run_lua(self.SCRIPT % (s.port, '{ ca_file = "%s" }' % self.cert))
        v = r.values()[0]
        self.assertEqual(v["code"], "EPROTO", r.stderr)
        self.assertIn("before the TLS handshake", v["err"])

    def test_a_bad_ca_file_is_an_error_value(self):
        s = self.serve()
        r = run_lua(self.SCRIPT % (s.port, '{ ca_file = "/nonexistent/ca.pem" }'))
        v = r.values()[0]
        self.assertEqual(v["code"], "EINVAL", r.stderr)
        self.assertIn("ca_file", v["err"])


class Console(unittest.TestCase):
    """segue.net.stdin under the console backend, in the default demo."""

    def test_the_default_demo_sends_typed_lines_to_memory_and_prints_them(self):
        d = tmpdir()
        p = subprocess.Popen([SEGUE, "run"], cwd=d, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        self.addCleanup(lambda: p.poll() is None and p.kill())
        p.stdin.write("hello there\n/me waves\n".encode())
        p.stdin.flush()
        seen, echoed = [], []
        while len(echoed) < 2:
            line = p.stdout.readline().decode()
            self.assertNotEqual(line, "", "stdout ended: %r" % seen)
            seen.append(line)
            if line.startswith("[memory "):
                echoed.append(line.rstrip("\n"))
        self.assertIn("segue demo", seen[0])
        self.assertIn('host = "irc.libera.chat"', "".join(seen))  # how to add IRC
        self.assertRegex(echoed[0], r"^\[memory !console:\d+\] segue: hello there$")
        self.assertRegex(echoed[1], r"^\[memory !console:\d+\] segue: \* waves$")
        p.terminate()
        _, err = p.communicate(timeout=15)
        self.assertEqual(p.returncode, 0, err.decode())

    def test_the_console_refuses_standalone_mode(self):
        source = os.environ.get("SEGUE_SOURCE_DIR") or os.path.join(os.path.dirname(__file__), "..", "..")
        p = subprocess.run([SEGUE, "backend", os.path.join(source, "backends", "console.lua")],
                           input=b"", capture_output=True, timeout=30)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("in standalone mode (`segue backend`) stdin and stdout carry the backend protocol",
                      p.stderr.decode())


if __name__ == "__main__":
    unittest.main()
