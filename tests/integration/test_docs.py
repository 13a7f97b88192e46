"""Docs that run: every code block of README.md and docs/ marked with
`run=KIND` in its info string is executed, so an example that does not work
as written fails the suite. The convention is described in docs/design.md
("Docs that run"); in short:

    ```lua run=config file=segue.lua     checked with `segue check`
    ```lua run=rules file=rules.lua      loaded and self-tested (`segue check`
                                         with a memory backend per name it uses)
    ```lua run=exec                      run with `segue exec`: exit 0, no
                                         error in the log, no request to a
                                         backend that does not exist
    ```sh run=shell                      run by bash -e in the document's
                                         scratch directory, `segue` on PATH
    ```text run=output                   each line appears in the output of
                                         the block run before it
    ```lua run=file file=echo.lua        only written, for later blocks

`file=NAME` saves the block under that name in the scratch directory before
any block of the document runs; `needs=a.env,dir/` creates empty files or
directories a config names; `needs=ircd` starts ngircd on a free loopback
port and replaces 6667 with that port in every block of the document.
Blocks run in document order; processes a shell block leaves running are
stopped when the document is done."""
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

from harness import SEGUE

SOURCE = os.path.abspath(os.environ.get("SEGUE_SOURCE_DIR")
                         or os.path.join(os.path.dirname(__file__), "..", ".."))
KINDS = ("config", "rules", "exec", "shell", "output", "file")
STEP_TIMEOUT = 90
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([^`\s]*)(.*)$")

# Documents whose walkthrough has a test file of its own (they need a server
# and take longer); everything else is run here.
OWN_TEST = {"docs/first-bridge.md": "test_first_bridge.py"}


class Block:
    def __init__(self, doc, line, lang, attrs, text):
        self.doc, self.line, self.lang, self.attrs, self.text = doc, line, lang, attrs, text

    @property
    def where(self):
        return "%s:%d" % (self.doc, self.line)


def parse(path, rel):
    """Every fenced block of the file: Block(doc, first line, lang, attrs, text)."""
    blocks = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang, rest = m.groups()
        attrs = {}
        for tok in rest.split():
            k, eq, v = tok.partition("=")
            attrs[k] = v if eq else True
        body, j = [], i + 1
        # CommonMark: the block ends at a fence of the same character, at
        # least as long, with nothing after it.
        while j < len(lines) and not (set(lines[j].strip()) == {fence[0]}
                                      and len(lines[j].strip()) >= len(fence)):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        blocks.append(Block(rel, i + 1, lang, attrs, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def documents():
    """README.md and every docs/**/*.md, as paths relative to the source."""
    docs = ["README.md"] + sorted(os.path.relpath(p, SOURCE) for p in
                                  glob.glob(os.path.join(SOURCE, "docs", "**", "*.md"), recursive=True))
    return docs


class DocRun:
    """Runs the marked blocks of one document in a scratch directory."""

    def __init__(self, rel):
        self.rel = rel
        self.blocks = [b for b in parse(os.path.join(SOURCE, rel), rel) if "run" in b.attrs]
        self.dir = tempfile.mkdtemp(prefix="segue-doc-")
        self.bin = os.path.join(self.dir, ".bin")
        os.mkdir(self.bin)
        os.symlink(os.path.abspath(SEGUE), os.path.join(self.bin, "segue"))
        # The README's commands name the binary where ./build.sh puts it.
        os.makedirs(os.path.join(self.dir, "build", "RelWithDebInfo"))
        os.symlink(os.path.abspath(SEGUE), os.path.join(self.dir, "build", "RelWithDebInfo", "segue"))
        self.env = dict(os.environ)
        self.env["PATH"] = self.bin + os.pathsep + self.env.get("PATH", "")
        self.env["EDITOR"] = "true"
        self.env["SEGUE_SOURCE_DIR"] = SOURCE
        self.groups = []      # process groups of shell blocks, stopped at the end
        self.servers = []
        self.last_output = ""
        self.log = []         # what ran, for failure messages

    def close(self):
        for pgid in self.groups:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                deadline = time.time() + wait
                while time.time() < deadline:
                    try:
                        os.killpg(pgid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.05)
        for s in self.servers:
            s.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def fail(self, block, what, output=""):
        raise AssertionError("%s: %s block (run=%s) %s\n--- block ---\n%s--- output ---\n%s"
                             % (block.where, block.lang or "plain", block.attrs["run"], what,
                                block.text, output[-6000:]))

    def path(self, block, name):
        if os.path.isabs(name) or ".." in name.split("/"):
            self.fail(block, "file=%s must be a relative path inside the scratch directory" % name)
        p = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def prepare(self):
        for b in self.blocks:
            if b.attrs["run"] not in KINDS:
                self.fail(b, "has an unknown kind; the kinds are " + ", ".join(KINDS))
        needs = set()
        for b in self.blocks:
            for n in str(b.attrs.get("needs", "")).split(","):
                if n:
                    needs.add(n)
        if "ircd" in needs:
            from irc_server import NgIRCd
            if not NgIRCd.available():
                raise unittest.SkipTest("%s needs ngircd, which is not installed (build.sh deps installs it)"
                                        % self.rel)
            server = NgIRCd().start()
            self.servers.append(server)
            for b in self.blocks:
                b.text = b.text.replace("6667", str(server.port))
            needs.discard("ircd")
        for n in sorted(needs):
            p = self.path(self.blocks[0], n.rstrip("/"))
            if n.endswith("/"):
                os.makedirs(p, exist_ok=True)
            elif not os.path.exists(p):
                open(p, "w").close()
        defaults = {"config": "segue.lua", "rules": "rules.lua", "exec": None, "shell": None,
                    "output": None, "file": None}
        for b in self.blocks:
            name = b.attrs.get("file") or defaults[b.attrs["run"]]
            if b.attrs["run"] == "file" and not name:
                self.fail(b, "needs file=NAME")
            if name:
                b.file = self.path(b, name)
                with open(b.file, "w") as f:
                    f.write(b.text)

    def run_proc(self, block, argv):
        # Output goes to files, not pipes: a process the block leaves running
        # in the background keeps its stdout open, and the block is done
        # when its own process exits.
        out_path = os.path.join(self.dir, ".out-%d" % block.line)
        err_path = os.path.join(self.dir, ".err-%d" % block.line)
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            p = subprocess.Popen(argv, cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL,
                                 stdout=out_f, stderr=err_f, start_new_session=True)
        self.groups.append(p.pid)
        try:
            p.wait(timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            self.fail(block, "did not finish within %d s" % STEP_TIMEOUT, self.read(out_path) + self.read(err_path))
        out, err = self.read(out_path), self.read(err_path)
        self.log.append((block.where, p.returncode))
        return p.returncode, out, err

    @staticmethod
    def read(path):
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")

    def check_config(self, block, path):
        rc, out, err = self.run_proc(block, [SEGUE, "check", path])
        if rc != 0:
            self.fail(block, "fails `segue check` (exit %d)" % rc, out + err)
        self.last_output = out + err

    def run_block(self, b):
        kind = b.attrs["run"]
        if kind == "config":
            self.check_config(b, b.file)
        elif kind == "rules":
            names = sorted(set(re.findall(r'"([A-Za-z0-9_.-]+):[^"\s]', b.text)))
            cfg = os.path.join(os.path.dirname(b.file), ".rules-check.lua")
            with open(cfg, "w") as f:
                f.write("data_dir = %r\nbackends = {\n" % os.path.join(self.dir, ".rules-data"))
                for n in names:
                    f.write('  [%r] = { script = "memory" },\n' % n)
                f.write("}\nrules = %r\n" % os.path.basename(b.file))
            self.check_config(b, cfg)
        elif kind == "exec":
            path = os.path.join(self.dir, ".snippet-%d.lua" % b.line)
            with open(path, "w") as f:
                f.write(b.text)
            rc, out, err = self.run_proc(b, [SEGUE, "exec", path])
            if rc != 0:
                self.fail(b, "fails `segue exec` (exit %d)" % rc, out + err)
            for bad in ("level=error", "there is no backend of that name"):
                if bad in err:
                    self.fail(b, "logs %r under `segue exec`" % bad, out + err)
            self.last_output = out
        elif kind == "shell":
            rc, out, err = self.run_proc(b, ["bash", "-e", "-o", "pipefail", "-c", b.text])
            if rc != 0:
                self.fail(b, "exits %d" % rc, out + err)
            self.last_output = out
        elif kind == "output":
            for line in b.text.splitlines():
                line = line.strip()
                if line and line != "..." and line not in self.last_output:
                    self.fail(b, "expects the line %r in the output of the block before it" % line,
                              self.last_output)

    def run(self):
        self.prepare()
        for b in self.blocks:
            self.run_block(b)
        return len(self.blocks)


def run_document(rel):
    d = DocRun(rel)
    try:
        return d.run()
    finally:
        d.close()


def _make_test(rel):
    def test(self):
        n = run_document(rel)
        self.assertGreaterEqual(n, 0)
    test.__doc__ = "the marked blocks of %s run as written" % rel
    return test


class Docs(unittest.TestCase):
    def test_the_readme_and_the_walkthroughs_have_blocks_that_run(self):
        readme = [b for b in parse(os.path.join(SOURCE, "README.md"), "README.md") if "run" in b.attrs]
        kinds = {b.attrs["run"] for b in readme}
        self.assertTrue({"config", "rules", "exec", "shell"} <= kinds, kinds)
        self.assertTrue(os.path.exists(os.path.join(SOURCE, "docs", "first-bridge.md")))

    def test_a_broken_example_fails(self):
        d = tempfile.mkdtemp(prefix="segue-doc-")
        self.addCleanup(shutil.rmtree, d, True)
        cases = {
            "config": "```lua run=config\nbackends = { x = { script = \"nosuch-backend\" } }\n```\n",
            "rules": "```lua run=rules\nreturn { bridge { \"a:#x\" } }\n```\n",
            "exec": "```lua run=exec\nerror('boom')\n```\n",
            "missing backend": "```lua run=exec\nlocal segue = require 'segue'\n"
                               "segue.backend('nope'):request({ type = 'RoomLookup', value = '#a' }, print)\n```\n",
            "shell": "```sh run=shell\nfalse\n```\n",
            "output": "```sh run=shell\necho hello\n```\n```text run=output\ngoodbye\n```\n",
            "self-test": "```lua run=rules\nreturn { bridge { \"a:#x\", \"b:#x\" },\n"
                         "test = function(sim) assert(#sim(\"a:#x\", \"hi\") == 2, \"expected two\") end }\n```\n",
        }
        for name, text in cases.items():
            with self.subTest(name):
                rel = os.path.join(d, name.replace(" ", "_") + ".md")
                with open(rel, "w") as f:
                    f.write(text)
                with self.assertRaises(AssertionError) as cm:
                    run_document(rel)
                self.assertIn(os.path.basename(rel) + ":", str(cm.exception))

    def test_a_working_example_passes_and_files_are_shared(self):
        d = tempfile.mkdtemp(prefix="segue-doc-")
        self.addCleanup(shutil.rmtree, d, True)
        rel = os.path.join(d, "ok.md")
        with open(rel, "w") as f:
            f.write("```lua run=config\nbackends = { a = { script = \"memory\" }, b = { script = \"memory\" } }\n"
                    "rules = \"rules.lua\"\n```\n"
                    "```lua run=rules\nreturn { bridge { \"a:#x\", \"b:#x\" },\n"
                    "test = function(sim) assert(#sim(\"a:#x\", \"hi\") == 1) end }\n```\n"
                    "```sh run=shell\nsegue check segue.lua\n```\n```text run=output\nsegue.lua: ok (2 backend(s))\n```\n")
        self.assertEqual(run_document(rel), 4)


for _rel in documents():
    if _rel in OWN_TEST:
        continue
    _name = "test_" + re.sub(r"[^A-Za-z0-9]+", "_", _rel)
    setattr(Docs, _name, _make_test(_rel))


if __name__ == "__main__":
    unittest.main()
