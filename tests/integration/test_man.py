"""The manual pages (mdoc, in man/) lint clean with mandoc and name what the
program has: every command of `segue --help`, every config key segue.config
knows, every function of the `segue` Lua module. And the bash completion
completes commands, options and config files."""
import os
import re
import shutil
import subprocess
import unittest

from harness import SEGUE, run, run_lua, tmpdir, write

SOURCE = os.environ.get("SEGUE_SOURCE_DIR") or os.path.join(os.path.dirname(__file__), "..", "..")
MAN = os.path.join(SOURCE, "man")
PAGES = ["segue.1", "segue.lua.5", "segue-lua.7"]
MANDOC = shutil.which("mandoc")
COMPLETION = os.path.join(SOURCE, "completion", "segue.bash")


def page(name):
    with open(os.path.join(MAN, name)) as f:
        return f.read()


@unittest.skipUnless(MANDOC, "mandoc is not installed (build.sh installs it)")
class Lint(unittest.TestCase):
    def test_every_page_lints_without_warnings(self):
        for name in PAGES:
            r = subprocess.run([MANDOC, "-T", "lint", "-W", "warning", os.path.join(MAN, name)],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual((r.returncode, r.stdout + r.stderr), (0, ""), name)

    def test_every_page_renders_with_its_sections(self):
        for name, sections in (("segue.1", ["SYNOPSIS", "SIGNALS", "FILES", "EXIT STATUS", "ENVIRONMENT"]),
                               ("segue.lua.5", ["LIMITS", "BACKENDS", "FEDERATION"]),
                               ("segue-lua.7", ["FUNCTIONS", "BACKENDS IN LUA"])):
            out = subprocess.run([MANDOC, "-T", "utf8", os.path.join(MAN, name)], capture_output=True,
                                 timeout=60).stdout.decode()
            plain = re.sub(".\b", "", out)
            for s in sections:
                self.assertIn("\n" + s + "\n", plain, name)


class Coverage(unittest.TestCase):
    def test_segue_1_names_every_command_of_the_usage(self):
        usage = run(["--help"]).stdout
        commands = re.findall(r"^  ([a-z]+) ", usage, re.M)
        self.assertGreaterEqual(len(commands), 8, usage)
        with open(os.path.join(SOURCE, "scripts", "segue", "cli.lua")) as f:  # the CLI's Lua commands
            commands += re.findall(r"^(?:function commands\.(\w+)|commands\.(\w+) =)", f.read(), re.M)
        commands = [c if isinstance(c, str) else c[0] or c[1] for c in commands]
        text = page("segue.1")
        for c in commands:
            self.assertIn(".Cm %s" % c, text, c)

    def test_segue_lua_5_names_every_config_key(self):
        r = run_lua("""
            local config = require "segue.config"
            local keys = {}
            for _, t in ipairs { config.defaults, config.limit_keys, config.federation_limit_keys } do
              for k in pairs(t) do keys[#keys + 1] = k end
            end
            out(keys)
        """)
        (keys,) = r.values()
        self.assertGreater(len(keys), 15)
        with open(os.path.join(SOURCE, "scripts", "segue", "config.lua")) as f:  # a local table there
            block = re.search(r"local federation_keys = \{(.*?)\n\}", f.read(), re.S).group(1)
        keys += re.findall(r"(\w+) = \"", block)
        with open(os.path.join(SOURCE, "scripts", "segue", "config.lua")) as f:
            block = re.search(r"local top_keys = \{(.*?)\n\}", f.read(), re.S).group(1)
        keys += re.findall(r"(\w+) = \"", block)
        text = page("segue.lua.5")
        missing = sorted(set(k for k in keys + ["cmd", "args", "env", "env_file", "cwd", "script", "options"]
                             if not re.search(r"\.(It|Cm)[^\n]*\b%s\b" % re.escape(k), text)))
        self.assertEqual(missing, [], "config keys missing from man/segue.lua.5 (document them there)")

    def test_segue_lua_7_names_every_function_of_the_module(self):
        r = run_lua("""
            local names = {}
            for k, v in pairs(segue) do if type(v) == "function" then names[#names + 1] = k end end
            out(names)
        """)
        (names,) = r.values()
        self.assertGreater(len(names), 10)
        text = page("segue-lua.7")
        for n in names:
            self.assertIn("segue." + n, text, n)


class Completion(unittest.TestCase):
    def complete(self, words, cwd=None):
        """COMPREPLY for the command line `words` (the last one is being typed)."""
        script = 'source %s; COMP_WORDS=(%s); COMP_CWORD=%d; _segue; printf "%%s\\n" "${COMPREPLY[@]}"' % (
            COMPLETION, " ".join("'%s'" % w for w in words), len(words) - 1)
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=cwd, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        return sorted(l for l in r.stdout.splitlines() if l)

    def test_commands_and_options_complete(self):
        self.assertEqual(self.complete(["segue", "ch"]), ["check"])
        self.assertEqual(self.complete(["segue", "-v", "re"]), ["reload"])
        self.assertEqual(self.complete(["segue", "--v"]), ["--version"])
        self.assertEqual(self.complete(["segue", "config", ""]), ["--default"])
        self.assertEqual(self.complete(["segue", "user", ""]), ["add", "list", "remove"])
        self.assertEqual(self.complete(["segue", "rules", ""]), ["test"])

    def test_config_paths_complete_to_lua_files_and_directories(self):
        d = tmpdir()
        self.addCleanup(shutil.rmtree, d, True)
        write(os.path.join(d, "segue.lua"), "")
        write(os.path.join(d, "notes.txt"), "")
        os.mkdir(os.path.join(d, "conf.d"))
        local = [c for c in self.complete(["segue", "check", ""], cwd=d) if not c.startswith("/etc/")]
        self.assertEqual(local, ["conf.d", "segue.lua"])
        self.assertNotIn("notes.txt", self.complete(["segue", "run", ""], cwd=d))
        self.assertEqual(self.complete(["segue", "backend", "se"], cwd=d), ["segue.lua"])


if __name__ == "__main__":
    unittest.main()
