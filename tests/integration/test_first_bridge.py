"""docs/first-bridge.md, "Your first bridge", run step by step as written
against a local IRC server (ngircd on a free loopback port): the config and
rules are checked, segue runs, an IRC user's line reaches the note, a line
written into the note reaches the IRC user, `segue watch` showed both and
`segue status` counted them (see test_docs.py for the block convention)."""
import unittest

from irc_server import NgIRCd
from test_docs import DocRun, parse, SOURCE
import os


class FirstBridge(unittest.TestCase):
    @unittest.skipUnless(NgIRCd.available(), "ngircd is not installed (build.sh deps installs it)")
    def test_every_step_of_the_walkthrough_runs_against_ngircd(self):
        d = DocRun("docs/first-bridge.md")
        self.addCleanup(d.close)
        n = d.run()
        kinds = [b.attrs["run"] for b in d.blocks]
        self.assertGreaterEqual(n, 15)
        self.assertIn("output", kinds)
        self.assertIn("shell", kinds)

    def test_the_walkthrough_uses_the_local_server(self):
        blocks = [b for b in parse(os.path.join(SOURCE, "docs/first-bridge.md"), "first-bridge.md")
                  if "run" in b.attrs]
        self.assertTrue(any("needs" in b.attrs and "ircd" in b.attrs["needs"] for b in blocks))


if __name__ == "__main__":
    unittest.main()


class DemoBanner(unittest.TestCase):
    """The default config's banner says how to bridge IRC into the terminal;
    following it to the letter (against ngircd) bridges both ways."""

    @unittest.skipUnless(NgIRCd.available(), "ngircd is not installed (build.sh deps installs it)")
    def test_the_banner_instructions_bridge_the_terminal_and_irc(self):
        import re
        import subprocess
        import threading
        from harness import SEGUE, run, tmpdir, wait_for, write
        from irc_server import RawClient
        server = NgIRCd().start()
        self.addCleanup(server.stop)
        d = tmpdir()
        default = run(["config", "--default"]).stdout
        banner = default[default.index("banner = [[") + len("banner = [["):default.index("]]")]
        irc = re.search(r"(irc = \{ script = \"irc\".*?\} \},)", banner, re.S).group(1)
        rule = re.search(r"(return \{ bridge .*\})", banner).group(1)
        irc = irc.replace('"irc.libera.chat"', '"127.0.0.1"').replace("6697", str(server.port))
        irc = irc.replace("tls = true", "tls = false")
        cfg = default.replace("backends = {\n", "backends = {\n" + irc + "\n", 1) + '\nrules = "rules.lua"\n'
        write(os.path.join(d, "segue.lua"), cfg)
        write(os.path.join(d, "rules.lua"), rule + "\n")
        self.assertEqual(run(["check", "segue.lua"], cwd=d).code, 0)
        alice = RawClient(server.port, "alice")
        self.addCleanup(alice.close)
        alice.join("#my-channel")
        p = subprocess.Popen([SEGUE, "run", "segue.lua"], cwd=d, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait()))
        out = []
        threading.Thread(target=lambda: [out.append(x) for x in p.stdout], daemon=True).start()
        alice.expect(r"^:my-bridge!\S+ JOIN :?#my-channel", 30)
        alice.say("#my-channel", "hi from irc")
        self.assertTrue(wait_for(lambda: any("hi from irc" in x for x in out), 20), out)
        p.stdin.write("hello irc\n")
        p.stdin.flush()
        alice.expect(r"PRIVMSG #my-channel :.*hello irc", 20)
        p.terminate()
        self.assertEqual(p.wait(20), 0)
