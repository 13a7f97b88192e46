"""The Debian packages: `dpkg-buildpackage -us -uc -b` builds segue and
libsegue-dev from a copy of the source, lintian finds no errors, and (as
root) they install with dpkg -i: the system user, the conffile, the data
directory, the unit, the man pages; `segue --version` and `segue check
/etc/segue/segue.lua` work, a program links libsegue.a through pkg-config;
then they are purged. Slow (a full build): ctest runs it alone."""
import glob
import os
import pwd
import re
import shutil
import stat
import subprocess
import unittest

from harness import tmpdir, write

SOURCE = os.path.abspath(os.environ.get("SEGUE_SOURCE_DIR") or os.path.join(os.path.dirname(__file__), "..", ".."))
BUILDPACKAGE = shutil.which("dpkg-buildpackage")
LINTIAN = shutil.which("lintian")
ANALYZE = shutil.which("systemd-analyze")


def sh(args, timeout=600, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


def installed(pkg):
    r = sh(["dpkg-query", "-W", "-f=${Status}", pkg])
    return r.returncode == 0 and "install ok installed" in r.stdout


class Control(unittest.TestCase):
    def test_build_depends_name_the_package_of_every_library_cmake_looks_for(self):
        with open(os.path.join(SOURCE, "CMakeLists.txt")) as f:
            modules = re.findall(r"pkg_check_modules\(\w+ REQUIRED IMPORTED_TARGET (\S+)\)", f.read())
        with open(os.path.join(SOURCE, "debian", "control")) as f:
            control = f.read()
        build_depends = control.split("Build-Depends:", 1)[1].split("\n\n", 1)[0]
        dev_depends = control.split("Package: libsegue-dev", 1)[1]
        self.assertGreater(len(modules), 5)
        for m in modules:
            pc = os.path.join(sh(["pkg-config", "--variable=pcfiledir", m]).stdout.strip(), m + ".pc")
            owner = sh(["dpkg-query", "-S", os.path.realpath(pc)])
            if owner.returncode != 0:
                owner = sh(["dpkg-query", "-S", pc])
            pkg = owner.stdout.split(":", 1)[0].strip()
            self.assertTrue(pkg, "no package owns %s" % pc)
            self.assertRegex(build_depends, r"\b%s\b" % re.escape(pkg), "Build-Depends lacks %s (%s)" % (pkg, m))
            self.assertRegex(dev_depends, r"\b%s\b" % re.escape(pkg), "libsegue-dev lacks %s (%s)" % (pkg, m))


@unittest.skipUnless(BUILDPACKAGE, "dpkg-buildpackage is not installed (build.sh installs dpkg-dev)")
class DebianPackage(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tmpdir()
        src = os.path.join(cls.dir, "segue")
        shutil.copytree(SOURCE, src, symlinks=True,
                        ignore=shutil.ignore_patterns(".git", "build", "build-*", "__pycache__"))
        env = dict(os.environ, DEB_BUILD_OPTIONS="nocheck noautodbgsym parallel=%d" % (os.cpu_count() or 2))
        r = sh([BUILDPACKAGE, "-us", "-uc", "-b"], timeout=1500, cwd=src, env=env)
        cls.build_log = r.stdout + r.stderr
        cls.build_rc = r.returncode
        cls.debs = {os.path.basename(p).split("_")[0]: p for p in glob.glob(os.path.join(cls.dir, "*.deb"))}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def test_1_it_builds_segue_and_libsegue_dev(self):
        self.assertEqual(self.build_rc, 0, self.build_log[-4000:])
        self.assertEqual(sorted(self.debs), ["libsegue-dev", "segue"])
        files = sh(["dpkg-deb", "-c", self.debs["segue"]]).stdout
        for f in ("./usr/bin/segue", "./etc/segue/segue.lua", "./var/lib/segue/",
                  "./lib/systemd/system/segue.service", "./usr/share/man/man1/segue.1.gz",
                  "./usr/share/man/man5/segue.lua.5.gz", "./usr/share/man/man7/segue-lua.7.gz",
                  "./usr/share/bash-completion/completions/segue"):
            self.assertIn(f, files)
        dev = sh(["dpkg-deb", "-c", self.debs["libsegue-dev"]]).stdout
        for f in ("./usr/include/segue.h", "/libsegue.a", "/pkgconfig/segue.pc", "/cmake/segue/segueConfig.cmake"):
            self.assertIn(f, dev)
        self.assertIn("/etc/segue/segue.lua", sh(["dpkg-deb", "-I", self.debs["segue"], "conffiles"]).stdout)

    @unittest.skipUnless(LINTIAN, "lintian is not installed (build.sh installs it)")
    def test_2_lintian_reports_no_errors(self):
        self.assertEqual(self.build_rc, 0, "the build failed")
        # lintian leaves its mldbm-elf-* files in $TMPDIR: here, removed with the rest
        tmp = os.path.join(self.dir, "lintian-tmp")
        os.makedirs(tmp, exist_ok=True)
        r = sh([LINTIAN, "--tag-display-limit", "0"] + sorted(self.debs.values()), timeout=600,
               env=dict(os.environ, TMPDIR=tmp))
        errors = [l for l in r.stdout.splitlines() if l.startswith("E:")]
        self.assertEqual(errors, [], r.stdout + r.stderr)

    @unittest.skipUnless(os.geteuid() == 0, "installing with dpkg -i needs root (CI runs as root)")
    def test_3_it_installs_runs_and_purges(self):
        self.assertEqual(self.build_rc, 0, "the build failed")
        if installed("segue") or installed("libsegue-dev"):
            self.skipTest("segue is installed on this machine already: not replacing it")
        had_user = any(p.pw_name == "segue" for p in pwd.getpwall())
        self.addCleanup(lambda: had_user or sh(["userdel", "segue"]))
        self.addCleanup(lambda: sh(["dpkg", "--purge", "segue", "libsegue-dev"]))
        r = sh(["dpkg", "-i", self.debs["segue"], self.debs["libsegue-dev"]], env=dict(
            os.environ, DEBIAN_FRONTEND="noninteractive"))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

        r = sh(["/usr/bin/segue", "--version"])
        self.assertEqual((r.returncode, r.stdout.split()[0]), (0, "segue"), r.stderr)
        r = sh(["/usr/bin/segue", "check", "/etc/segue/segue.lua"])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("/etc/segue/segue.lua: ok", r.stdout + r.stderr)

        user = pwd.getpwnam("segue")
        st = os.stat("/var/lib/segue")
        self.assertEqual((st.st_uid, stat.S_IMODE(st.st_mode)), (user.pw_uid, 0o700))
        conf = os.stat("/etc/segue/segue.lua")
        self.assertEqual((conf.st_gid, stat.S_IMODE(conf.st_mode)), (user.pw_gid, 0o640))
        if ANALYZE:
            args = [ANALYZE, "verify"] + ([] if shutil.which("man") else ["--man=no"])
            r = sh(args + ["/lib/systemd/system/segue.service"])
            problems = [l for l in (r.stdout + r.stderr).splitlines() if "segue.service" in l]
            self.assertEqual((r.returncode, problems), (0, []), r.stdout + r.stderr)

        # libsegue-dev: a program embedding the runtime through the CMake
        # package (segue::segue is the static library here), and pkg-config
        d = tmpdir()
        self.addCleanup(shutil.rmtree, d, True)
        write(os.path.join(d, "v.c"), '#include <stdio.h>\n#include <segue.h>\n'
              'int main(void) { printf("%s\\n", sg_version_string()); return 0; }\n')
        write(os.path.join(d, "CMakeLists.txt"), "cmake_minimum_required(VERSION 3.18)\nproject(v C)\n"
              "find_package(segue 0.1 REQUIRED)\nadd_executable(v v.c)\n"
              "target_link_libraries(v PRIVATE segue::segue)\n")
        r = sh(["cmake", "-S", d, "-B", os.path.join(d, "b")])
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        r = sh(["cmake", "--build", os.path.join(d, "b")])
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        version = sh(["/usr/bin/segue", "--version"]).stdout.split()[1]
        self.assertEqual(sh([os.path.join(d, "b", "v")]).stdout.strip(), version)
        self.assertEqual(sh(["pkg-config", "--modversion", "segue"]).stdout.strip(), version)

        r = sh(["dpkg", "--purge", "segue", "libsegue-dev"])
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertFalse(os.path.exists("/usr/bin/segue"))
        self.assertFalse(os.path.exists("/etc/segue/segue.lua"))
        self.assertFalse(os.path.exists("/var/lib/segue"))


if __name__ == "__main__":
    unittest.main()
