"""A real IRC server (Debian's ngircd) on a loopback port, and a raw IRC
client over a plain socket, for the IRC backend's integration tests."""
import os
import re
import shutil
import socket
import ssl
import subprocess
import time

from harness import tmpdir, write, free_port

NGIRCD = shutil.which("ngircd") or "/usr/sbin/ngircd"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"



def make_cert(d, name="localhost"):
    """A self-signed certificate for `name`: (cert path, key path)."""
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=" + name, "-addext", "subjectAltName=DNS:" + name,
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    os.chmod(key, 0o644)  # ngircd drops to nobody
    return cert, key


class NgIRCd:
    """ngircd in the foreground (-n) with a generated config in a temp dir."""

    def __init__(self, password=None, tls=False):
        self.dir = tmpdir()
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.proc = None
        ssl_section = ""
        if tls:
            cert, key = make_cert(self.dir)
            ssl_section = "[SSL]\nCertFile = %s\nKeyFile = %s\nPorts = %d\n" % (cert, key, self.tls_port)
        self.conf = write(os.path.join(self.dir, "ngircd.conf"), """
[Global]
Name = irc.test
Info = segue test server
AdminInfo1 = segue tests
AdminInfo2 = loopback
AdminEMail = nobody@example.org
Listen = 127.0.0.1
Ports = %d
MotdPhrase = segue test
ServerUID = 65534
ServerGID = 65534
%s
[Limits]
MaxNickLength = 30
PingTimeout = 120
PongTimeout = 20
MaxConnectionsIP = 50
[Options]
PAM = no
Ident = no
DNS = no
%s""" % (self.port, "Password = %s" % password if password else "", ssl_section))

    @staticmethod
    def available():
        return os.path.exists(NGIRCD)

    def start(self):
        self.log = open(os.path.join(self.dir, "ngircd.log"), "ab")
        self.proc = subprocess.Popen([NGIRCD, "-n", "-f", self.conf], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        # With TLS, ngircd first generates DH parameters: seconds, more on
        # a loaded machine.
        deadline = time.time() + (60 if self.tls_port else 10)
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("ngircd exited: " + self.output())
                time.sleep(0.05)
        raise RuntimeError("ngircd did not listen: " + self.output())

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc:
            self.log.close()
        self.proc = None

    def output(self):
        with open(os.path.join(self.dir, "ngircd.log"), "rb") as f:
            return f.read().decode(errors="replace")


class RawClient:
    """An IRC user typed by hand: lines in and out, PINGs answered."""

    def __init__(self, port, nick, host="127.0.0.1", password=None, caps=()):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""
        self.nick = nick
        self.seen = []
        if caps:  # IRCv3: lines then start with "@tags "
            self.send("CAP REQ :" + " ".join(caps))
        if password:
            self.send("PASS " + password)
        self.send("NICK " + nick)
        self.send("USER %s 0 * :raw client" % nick)
        if caps:
            self.send("CAP END")
        self.expect(r"^(@\S+ )?:\S+ 001 ")

    def send(self, line):
        self.sock.sendall(line.encode() + b"\r\n")

    def join(self, *channels):
        for ch in channels:
            self.send("JOIN " + ch)
            self.expect(r"^(@\S+ )?:\S+ 366 \S+ %s " % re.escape(ch))

    def say(self, target, text):
        self.send("PRIVMSG %s :%s" % (target, text))

    def lines(self, timeout):
        """Yields lines until `timeout` seconds have passed."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            while b"\r\n" in self.buf:
                line, self.buf = self.buf.split(b"\r\n", 1)
                text = line.decode(errors="replace")
                self.seen.append(text)
                if text.startswith("PING "):
                    self.send("PONG " + text[5:])
                    continue
                yield text
            self.sock.settimeout(max(0.05, deadline - time.time()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            self.buf += data

    def expect(self, pattern, timeout=20):
        """The first line matching the regular expression, or AssertionError."""
        for line in self.lines(timeout):
            if re.search(pattern, line):
                return line
        raise AssertionError("no line matching %r in %d s; last lines:\n%s"
                             % (pattern, timeout, "\n".join(self.seen[-20:])))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def tls_wrap_server(sock, cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx.wrap_socket(sock, server_side=True)


class FakeIrc:
    """A scripted IRC server for what ngircd lacks (SASL) or hides (timing):
    one client; every line it sends is kept with its arrival time. It offers
    one capability, sasl (CAP LS 302)."""

    def __init__(self, sasl_mechs=None, password=None):
        """sasl_mechs: the CAP LS 302 value of sasl ("SCRAM-SHA-256,PLAIN");
        password: what a SCRAM login must prove (the server's side of RFC
        5802, with hashlib)."""
        import threading
        self.sasl_mechs, self.password = sasl_mechs, password
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.lines = []  # (time, line)
        self.accepted = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _reply(self, conn, line):
        conn.sendall(line.encode() + b"\r\n")

    def _answer(self, conn, line, state):
        cmd = line.split(" ")[0]
        if line.startswith("CAP LS"):
            self._reply(conn, ":fake CAP * LS :sasl" + ("=" + self.sasl_mechs if self.sasl_mechs else ""))
            state["cap"] = True
        elif line == "CAP REQ :sasl":
            self._reply(conn, ":fake CAP * ACK :sasl")
        elif line == "AUTHENTICATE PLAIN":
            self._reply(conn, "AUTHENTICATE +")
        elif line.startswith("AUTHENTICATE SCRAM-"):
            state["scram"] = {"alg": line.split("-")[-1].lower().replace("sha", "sha")}
            self._reply(conn, "AUTHENTICATE +")
        elif cmd == "AUTHENTICATE" and "scram" in state:
            self._scram(conn, line.split(" ", 1)[1], state)
        elif cmd == "AUTHENTICATE":
            self._reply(conn, ":fake 903 * :SASL authentication successful")
        elif cmd == "NICK":
            state["nick"] = line.split(" ")[1]
        elif cmd == "JOIN":
            self._reply(conn, ":%s!u@h JOIN %s" % (state["nick"], line.split(" ")[1]))
        if cmd in ("USER", "CAP") and "nick" in state and (line == "CAP END" or not state.get("cap")):
            self._reply(conn, ":fake 001 %s :Welcome" % state["nick"])
        if line.startswith("CAP REQ"):
            state["cap"] = True

    def _scram(self, conn, payload, state):
        import base64, hashlib, hmac
        sc = state["scram"]
        alg = {"256": "sha256", "1": "sha1"}[sc["alg"]]
        H = lambda d: hashlib.new(alg, d).digest()
        mac = lambda k, d: hmac.new(k, d, alg).digest()
        data = base64.b64decode(payload) if payload != "+" else b""
        if "first" not in sc:
            sc["first"] = data.decode()[3:]  # without "n,,"
            cnonce = dict(kv.split("=", 1) for kv in sc["first"].split(","))["r"]
            sc["salt"], sc["iter"] = b"segue-salt", 4096
            sc["server_first"] = "r=%sSERVER,s=%s,i=%d" % (cnonce, base64.b64encode(sc["salt"]).decode(), sc["iter"])
            self._reply(conn, "AUTHENTICATE " + base64.b64encode(sc["server_first"].encode()).decode())
        elif "done" not in sc:
            final = data.decode()
            without_proof, proof = final.rsplit(",p=", 1)
            auth = ("%s,%s,%s" % (sc["first"], sc["server_first"], without_proof)).encode()
            salted = hashlib.pbkdf2_hmac(alg, self.password.encode(), sc["salt"], sc["iter"])
            client_key = mac(salted, b"Client Key")
            signature = mac(H(client_key), auth)
            expected = bytes(a ^ b for a, b in zip(client_key, signature))
            if not hmac.compare_digest(expected, base64.b64decode(proof)):
                self._reply(conn, ":fake 904 * :SASL authentication failed")
                return
            sc["done"] = True
            server_sig = mac(mac(salted, b"Server Key"), auth)
            self._reply(conn, "AUTHENTICATE " + base64.b64encode(b"v=" + base64.b64encode(server_sig)).decode())
        else:
            self._reply(conn, ":fake 903 * :SASL authentication successful")

    def _serve(self):
        conn, _ = self.sock.accept()
        self.accepted = True
        buf, state = b"", {}
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n" in buf:
                    raw, buf = buf.split(b"\r\n", 1)
                    line = raw.decode(errors="replace")
                    self.lines.append((time.time(), line))
                    self._answer(conn, line, state)

    def wait_done(self, timeout=30):
        """Once the client is gone: waits (bounded) until the server thread
        read its connection to the end, so self.lines holds every line."""
        if self.accepted:
            self.thread.join(timeout)

    def sent(self, prefix):
        return [(t, l) for t, l in self.lines if l.startswith(prefix)]

    def close(self):
        self.sock.close()
