"""`cmake --install` gives a usable libsegue: the example in examples/embed,
built against the installed prefix only (with pkg-config, shared and static,
and with find_package(segue)), runs from a directory that has no source tree
and exits 0. The build tree's own configuration (compiler, sanitizers) is
read from its CMakeCache.txt, since an ASan-built library needs ASan in the
program too."""
import glob
import os
import shutil
import subprocess
import tempfile
import unittest

SOURCE = os.environ.get("SEGUE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY = os.environ.get("SEGUE_BINARY_DIR", os.path.join(SOURCE, "build"))
EXAMPLE = os.path.join(SOURCE, "examples", "embed")
RULES = os.path.join(EXAMPLE, "bridge.lua")


def cache(key, default=""):
    with open(os.path.join(BINARY, "CMakeCache.txt")) as f:
        for line in f:
            name, _, value = line.rstrip("\n").partition("=")
            if name.split(":")[0] == key:
                return value
    return default


SANITIZE = ["-fsanitize=address,undefined"] if cache("CMAKE_BUILD_TYPE") == "Sanitize" else []
CC = cache("CMAKE_C_COMPILER", "cc")


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    if p.returncode != 0:
        raise AssertionError("%s failed (%d):\n%s\n%s" % (" ".join(cmd), p.returncode,
                                                           p.stdout, p.stderr))
    return p


class InstalledSegue(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="segue-install-")
        cls.prefix = os.path.join(cls.tmp, "prefix")
        run(["cmake", "--install", BINARY, "--prefix", cls.prefix])
        pcs = glob.glob(os.path.join(cls.prefix, "lib*", "**", "segue.pc"), recursive=True)
        assert len(pcs) == 1, pcs
        cls.pkgconfig_dir = os.path.dirname(pcs[0])
        cls.libdir = os.path.dirname(cls.pkgconfig_dir)
        # Nothing of the source or build tree may be needed from here on.
        cls.elsewhere = os.path.join(cls.tmp, "elsewhere")
        os.mkdir(cls.elsewhere)
        cls.rules = os.path.join(cls.elsewhere, "bridge.lua")
        shutil.copy(RULES, cls.rules)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def pkg_config(self, *args):
        env = dict(os.environ, PKG_CONFIG_PATH=self.pkgconfig_dir)
        return run(["pkg-config"] + list(args) + ["segue"], env=env).stdout.split()

    def run_example(self, exe):
        p = subprocess.run([exe, self.rules], cwd=self.elsewhere, capture_output=True,
                           text=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("embed: notes has it:", p.stderr)
        self.assertTrue(p.stderr.rstrip().endswith("embed: ok"), p.stderr)

    def test_installs_library_header_and_package_files(self):
        for pattern in ["include/segue.h", "lib*/libsegue.a", "lib*/libsegue.so*",
                        "lib*/cmake/segue/segueConfig.cmake",
                        "lib*/cmake/segue/segueConfigVersion.cmake",
                        "lib*/cmake/segue/segueTargets.cmake", "bin/segue"]:
            self.assertTrue(glob.glob(os.path.join(self.prefix, pattern)), pattern)
        self.assertEqual(self.pkg_config("--modversion"), ["0.1.0"])

    def test_example_builds_with_pkg_config_shared(self):
        exe = os.path.join(self.tmp, "embed-shared")
        run([CC, "-o", exe, os.path.join(EXAMPLE, "embed.c")] + SANITIZE
            + self.pkg_config("--cflags", "--libs") + ["-Wl,-rpath," + self.libdir])
        needed = run(["ldd", exe]).stdout
        self.assertIn(os.path.realpath(self.libdir), os.path.realpath(
            needed.split("libsegue.so.0 => ")[1].split()[0]))
        self.run_example(exe)

    def test_example_builds_with_pkg_config_static(self):
        exe = os.path.join(self.tmp, "embed-static")
        # libsegue.a with the system's shared libraries: `--static` would also
        # want the static dependencies of libcurl, which Debian does not ship.
        requires = self.pkg_config("--print-requires-private")
        libs = [os.path.join(self.libdir, "libsegue.a") if a == "-lsegue" else a
                for a in self.pkg_config("--libs")]
        env = dict(os.environ, PKG_CONFIG_PATH=self.pkgconfig_dir)
        libs += run(["pkg-config", "--libs"] + requires, env=env).stdout.split()
        with open(os.path.join(self.pkgconfig_dir, "segue.pc")) as f:
            own = [l for l in f if l.startswith("Libs.private:")]
        libs += own[0].split(":", 1)[1].split()
        run([CC, "-o", exe, os.path.join(EXAMPLE, "embed.c")] + SANITIZE
            + self.pkg_config("--cflags") + libs)
        self.assertNotIn("libsegue", run(["ldd", exe]).stdout)
        self.run_example(exe)

    def test_example_builds_with_find_package(self):
        build = os.path.join(self.tmp, "cmake-build")
        flags = " ".join(SANITIZE)
        run(["cmake", "-S", EXAMPLE, "-B", build, "-DCMAKE_PREFIX_PATH=" + self.prefix,
             "-DCMAKE_C_COMPILER=" + CC, "-DCMAKE_C_FLAGS=" + flags,
             "-DCMAKE_EXE_LINKER_FLAGS=" + flags, "-DBUILD_TESTING=OFF"])
        run(["cmake", "--build", build])
        self.run_example(os.path.join(build, "embed"))


if __name__ == "__main__":
    unittest.main()
