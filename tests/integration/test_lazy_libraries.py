"""Issue 13 (idle memory): libcurl and libpq are loaded when first used
(dlopen), not when segue starts: with them came some thirty libraries
(GnuTLS, p11-kit, Kerberos, LDAP...) whose relocated data is private memory
of every process. An idle segue maps neither; one with federation loads
libcurl for its hRPC client, and works (test_federation makes real calls,
test_store_pg uses libpq)."""
import os
import shutil
import signal
import subprocess
import unittest

from harness import tmpdir, write, free_port, LogTail, SEGUE


class LazyLibraries(unittest.TestCase):
    def setUp(self):
        self.d = tmpdir()
        self.addCleanup(shutil.rmtree, self.d, True)

    def start(self, config, ready):
        write(os.path.join(self.d, "cfg.lua"), config)
        proc = subprocess.Popen([SEGUE, "run", "cfg.lua"], cwd=self.d, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        log = LogTail(proc)

        def stop():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stderr.close()
        self.addCleanup(stop)
        self.assertTrue(log.wait_for(ready), log.text())
        with open("/proc/%d/maps" % proc.pid) as f:
            return {os.path.basename(line.split()[-1]).split(".so")[0]
                    for line in f if ".so" in line}

    def test_an_idle_segue_maps_neither_libcurl_nor_libpq(self):
        libs = self.start('backends = {}\n', "running with 0 backend(s)")
        self.assertIn("libsqlite3", libs)  # the store it runs with
        for lib in ("libcurl", "libpq", "libgnutls", "libkrb5", "libldap-2"):
            self.assertNotIn(lib, libs)

    def test_federation_loads_libcurl_when_it_starts(self):
        port = free_port()
        libs = self.start('backends = {}\nserver_id = "localhost:%d"\nlisten = "127.0.0.1:%d"\n' % (port, port),
                          "running with 0 backend(s)")
        self.assertIn("libcurl", libs)
        self.assertNotIn("libpq", libs)


if __name__ == "__main__":
    unittest.main()
