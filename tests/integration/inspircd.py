"""Debian's InspIRCd 3 on a loopback port with its IRCv3 modules, and a
small draft/chathistory responder in front of it (InspIRCd 3 has no
CHATHISTORY), for the IRC backend's IRCv3 tests."""
import os
import re
import shutil
import socket
import subprocess
import threading
import time

from harness import tmpdir, write, free_port

INSPIRCD = shutil.which("inspircd") or "/usr/sbin/inspircd"
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
NOBODY = "65534"  # nobody/nogroup on Debian: InspIRCd refuses to run as root

MODULES = ["cap", "ircv3", "ircv3_capnotify", "ircv3_ctctags", "ircv3_msgid", "ircv3_servertime",
           "ircv3_echomessage", "ircv3_batch", "ircv3_labeledresponse", "ircv3_accounttag",
           "services_account"]


class InspIRCd:
    """inspircd --nofork with a generated config in a temp dir; as nobody
    when the test runs as root (CI)."""

    def __init__(self):
        self.dir = tmpdir()
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.proc = None
        write(os.path.join(self.dir, "motd"), "segue test\n")
        self.conf = write(os.path.join(self.dir, "inspircd.conf"), """
<server name="irc.test" description="segue test server" network="SegueTest">
<admin name="segue" nick="segue" email="nobody@example.org">
<bind address="127.0.0.1" port="%d" type="clients">
<connect allow="*" timeout="60" threshold="1000" pingfreq="120" hardsendq="1048576"
         softsendq="65536" recvq="65536" localmax="100" globalmax="100" useident="no"
         resolvehostnames="no" fakelag="off" commandrate="1000000">
<files motd="%s/motd">
<dns server="127.0.0.1" timeout="1">
<options prefixquit="Quit: ">
<security hideserver="" userstats="Pu" maxtargets="20">
<performance softlimit="100" somaxconn="64">
%s
""" % (self.port, self.dir, "\n".join('<module name="%s">' % m for m in MODULES)))

    @staticmethod
    def available():
        return os.path.exists(INSPIRCD)

    def start(self):
        cmd = [INSPIRCD, "--nofork", "--nopid", "--config=" + self.conf]
        if os.geteuid() == 0:
            cmd = [SETPRIV, "--reuid=" + NOBODY, "--regid=" + NOBODY, "--clear-groups"] + cmd
        self.log = open(os.path.join(self.dir, "inspircd.out"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("inspircd exited: " + self.output())
                time.sleep(0.05)
        raise RuntimeError("inspircd did not listen: " + self.output())

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc:
            self.log.close()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def output(self):
        with open(os.path.join(self.dir, "inspircd.out"), "rb") as f:
            return f.read().decode(errors="replace")


def _tags(line):
    if not line.startswith("@"):
        return {}, line
    raw, rest = line[1:].split(" ", 1)
    return dict(t.split("=", 1) if "=" in t else (t, "") for t in raw.split(";")), rest


class ChatHistoryProxy:
    """Sits between IRC clients and the real server, relaying every line, and
    adds draft/chathistory (the IRCv3 draft spec): offered in CAP LS,
    acknowledged when requested, and CHATHISTORY BEFORE answered from the
    channel messages (with their msgid and time) it relayed to any client."""

    def __init__(self, upstream_port):
        self.upstream = upstream_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.history = {}       # channel -> [(msgid, time, source, text)]
        self.commands = []      # CHATHISTORY lines received
        self.lock = threading.Lock()
        self.conns = []
        self.batches = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            u.settimeout(None)
            self.conns += [c, u]
            state = {"wants": False}
            threading.Thread(target=self._pump, args=(c, u, self._from_client, state), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, self._from_server, state), daemon=True).start()

    @staticmethod
    def _pump(src, dst, edit, state):
        buf = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                buf += data
                while b"\r\n" in buf:
                    raw, buf = buf.split(b"\r\n", 1)
                    for out in edit(raw.decode(errors="replace"), src, state):
                        dst.sendall(out.encode() + b"\r\n")
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _from_client(self, line, client, state):
        tags, rest = _tags(line)
        words = rest.split(" ")
        if words[0] == "CAP" and len(words) > 1 and words[1] == "REQ":
            caps = rest.split(" ", 2)[2].lstrip(":").split()
            if "draft/chathistory" in caps:
                state["wants"] = True
                caps.remove("draft/chathistory")
            return ["CAP REQ :" + " ".join(caps)] if caps else []
        if words[0] == "CHATHISTORY":
            self.commands.append(rest)
            client.sendall("".join(l + "\r\n" for l in self._answer(tags, words)).encode())
            return []
        return [line]

    def _from_server(self, line, server, state):
        tags, rest = _tags(line)
        m = re.match(r"^:(\S+) (\S+) (.*)$", rest)
        if m and m.group(2) == "CAP":
            args = m.group(3).split(" ")
            if args[1] == "LS" and args[2] != "*":
                line = line.rstrip() + " draft/chathistory"
            elif args[1] == "ACK" and state.get("wants"):
                line, state["wants"] = line.rstrip() + " draft/chathistory", False
        elif m and m.group(2) == "PRIVMSG" and "msgid" in tags:
            target, text = m.group(3).split(" ", 1)
            if target.startswith("#"):
                with self.lock:
                    h = self.history.setdefault(target.lower(), [])
                    if tags["msgid"] not in [x[0] for x in h]:
                        h.append((tags["msgid"], tags.get("time"), m.group(1), text[1:] if text.startswith(":") else text))
        return [line]

    def _answer(self, tags, words):
        # CHATHISTORY BEFORE <target> msgid=<id> <limit>
        if len(words) < 5 or words[1] != "BEFORE" or not words[3].startswith("msgid="):
            return ["FAIL CHATHISTORY INVALID_PARAMS %s :only BEFORE msgid= here" % words[1]]
        target, msgid, limit = words[2], words[3][6:], int(words[4])
        with self.lock:
            h = list(self.history.get(target.lower(), []))
        ids = [x[0] for x in h]
        if msgid not in ids:
            return ["FAIL CHATHISTORY INVALID_MSGREFTYPE BEFORE %s :unknown msgid" % target]
        older = h[max(0, ids.index(msgid) - limit):ids.index(msgid)]
        self.batches += 1
        ref = "h%d" % self.batches
        label = "@label=%s " % tags["label"] if "label" in tags else ""
        out = ["%s:irc.test BATCH +%s chathistory %s" % (label, ref, target)]
        for mid, t, source, text in older:
            out.append("@batch=%s;msgid=%s;time=%s :%s PRIVMSG %s :%s" % (ref, mid, t, source, target, text))
        out.append(":irc.test BATCH -%s" % ref)
        return out

    def close(self):
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
