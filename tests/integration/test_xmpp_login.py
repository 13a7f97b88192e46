"""The XMPP backend's login and connection against Debian's Prosody on
loopback ports: direct TLS with a pinned certificate, an untrusted
certificate, a wrong password, PLAIN only over TLS, plain text refused off
loopback, a new room configured so others can join, and standalone mode.
(The bridging tests are test_xmpp.py.)"""
import json
import os
import subprocess
import unittest

from harness import SEGUE, run_lua
from test_irc import lua
from test_xmpp import PY, ROOM, SOURCE
from xmpp_server import Client, Prosody, available


@unittest.skipUnless(available(), "prosody is not installed (Debian package prosody)")
class XmppConnection(unittest.TestCase):
    def setUp(self):
        self.server = Prosody({"bridge": "bridge-secret"}).start()
        self.addCleanup(self.server.close)

    def join(self, wait_ms=20000, **opts):
        o = {"jid": "bridge@localhost", "password": "bridge-secret", "host": "127.0.0.1",
             "port": self.server.port, "timeout_ms": 5000, "reconnect_ms": 200}
        o.update(opts)
        return run_lua("""
            assert(segue.add_backend("xmpp", { script = "xmpp", options = %s }))
            out(segue.await(function()
              local x = segue.backend("xmpp")
              local id = x:request { type = "RoomLookup", value = %s }
              local ok, err = x:request { type = "RoomJoin", value = id.value }
              return { ok = ok and ok.type, err = err }
            end, %d))
        """ % (lua(o), lua(ROOM), wait_ms))

    def test_direct_tls_with_a_pinned_certificate_logs_in(self):
        import hashlib
        import ssl
        with open(self.server.cert) as f:
            pin = hashlib.sha256(ssl.PEM_cert_to_DER_cert(f.read())).hexdigest()
        r = self.join(tls="direct", port=self.server.tls_port, pin=pin)
        self.assertEqual(r.values(), [{"ok": "Success"}], r.stderr)
        self.assertIn("with SCRAM-SHA-1 over TLS", r.stderr)

    def test_an_untrusted_certificate_is_refused_and_nothing_is_sent_in_the_clear(self):
        r = self.join(wait_ms=4000)  # no ca_file: the self-signed certificate does not verify
        self.assertNotEqual(r.values(), [{"ok": "Success"}], r.stderr)
        self.assertIn("certificate verify failed", r.stderr)
        self.assertNotIn("logged in", r.stderr)

    def test_a_wrong_password_is_refused_with_a_clear_error(self):
        r = self.join(wait_ms=4000, ca_file=self.server.cert, password="wrong", timeout_ms=3000)
        self.assertNotEqual(r.values(), [{"ok": "Success"}], r.stderr)
        self.assertIn("login refused (SCRAM-SHA-1): not-authorized", r.stderr)

    def test_plain_text_is_refused_off_loopback(self):
        r = run_lua("""
            local ok, err = segue.add_backend("x", { script = "xmpp", options = { jid = "a@example.org", password = "p", tls = false } })
            segue.sleep(300)
            out { ok = ok, err = err }
        """)
        self.assertIn("tls = false is only for a server on loopback", r.stdout + r.stderr)

    def test_standalone_speaks_the_backend_protocol(self):
        script = os.path.join(SOURCE, "backends", "xmpp.lua")
        p = subprocess.Popen([SEGUE, "backend", script, "jid=bridge@localhost", "password=bridge-secret",
                              "host=127.0.0.1", "port=%d" % self.server.port, "ca_file=" + self.server.cert],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            init = json.loads(p.stdout.readline())
            self.assertEqual(init["backend_name"], "xmpp")
            for n, req in enumerate(({"type": "RoomLookup", "value": "Test@Conference.localhost"},
                                     {"type": "RoomJoin", "value": ROOM})):
                p.stdin.write((json.dumps({"sequence_number": n, "body": req}) + "\n").encode())
                p.stdin.flush()
            answers = {}
            while len(answers) < 2:
                v = json.loads(p.stdout.readline())
                if "sequence_number" in v:
                    answers[v["sequence_number"]] = v["body"]
            self.assertEqual(answers[0], {"type": "RoomID", "value": ROOM})
            self.assertEqual(answers[1]["type"], "Success", answers)
        finally:
            p.stdin.close()
            p.wait(15)
            p.stdout.close()
            p.stderr.close()


@unittest.skipUnless(available(), "prosody is not installed (Debian package prosody)")
@unittest.skipUnless(PY, "slixmpp is not installed (Debian package python3-slixmpp)")
class XmppNewRoom(unittest.TestCase):
    def test_a_room_the_bridge_creates_is_configured_so_others_can_join(self):
        # Prosody's default: a new room is locked until its owner configures it.
        server = Prosody({"bridge": "bridge-secret", "bob": "bob-secret"}, muc_locking=True).start()
        self.addCleanup(server.close)
        room = "fresh@conference.localhost"
        o = {"jid": "bridge@localhost", "password": "bridge-secret", "host": "127.0.0.1",
             "port": server.port, "ca_file": server.cert, "timeout_ms": 5000}
        p = subprocess.Popen([SEGUE, "backend", os.path.join(SOURCE, "backends", "xmpp.lua")]
                             + ["%s=%s" % kv for kv in o.items()],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (p.stdin.close(), p.wait(15), p.stdout.close()))
        json.loads(p.stdout.readline())  # InitInfo
        p.stdin.write((json.dumps({"sequence_number": 1, "body": {"type": "RoomJoin", "value": room}}) + "\n").encode())
        p.stdin.flush()
        while True:
            v = json.loads(p.stdout.readline())
            if v.get("sequence_number") == 1:
                break
        self.assertEqual(v["body"]["type"], "Success", v)
        bob = Client(PY, server, "bob@localhost", "bob-secret", room, "bob")
        self.addCleanup(bob.close)
        bob.wait(lambda e: e.get("joined") == room, what="bob's join of the room the bridge made")


@unittest.skipUnless(available(), "prosody is not installed (Debian package prosody)")
class XmppPlain(unittest.TestCase):
    """A server that offers only PLAIN, also without TLS."""

    def setUp(self):
        self.server = Prosody({"bridge": "bridge-secret"}, extra="""
disable_sasl_mechanisms = { "SCRAM-SHA-1", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256" }
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
""").start()
        self.addCleanup(self.server.close)

    def run_backend(self, wait_ms=20000, **opts):
        o = {"jid": "bridge@localhost", "password": "bridge-secret", "host": "127.0.0.1",
             "port": self.server.port, "ca_file": self.server.cert, "timeout_ms": 3000, "reconnect_ms": 100}
        o.update(opts)
        return run_lua("""
            assert(segue.add_backend("xmpp", { script = "xmpp", options = %s }))
            out(segue.await(function()
              local ok, err = segue.backend("xmpp"):request { type = "RoomJoin", value = %s }
              return { ok = ok and ok.type, err = err }
            end, %d))
        """ % (lua(o), lua(ROOM), wait_ms))

    def test_plain_is_used_over_tls(self):
        r = self.run_backend()
        self.assertEqual(r.values(), [{"ok": "Success"}], r.stderr)
        self.assertIn("with PLAIN over TLS", r.stderr)

    def test_plain_is_refused_without_tls_even_on_loopback(self):
        r = self.run_backend(wait_ms=4000, tls=False)
        self.assertNotEqual(r.values(), [{"ok": "Success"}], r.stderr)
        self.assertIn("no SASL mechanism we may use (offered: PLAIN; PLAIN only over TLS)", r.stderr)
        self.assertNotIn("logged in", r.stderr)


if __name__ == "__main__":
    unittest.main()
