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
