"""Issue 13 (idle memory): libcurl, libpq and OpenSSL are loaded when first
used (dlopen), not when segue starts: with them came some thirty libraries
(GnuTLS, p11-kit, Kerberos, LDAP...) whose relocated data is private memory
of every process, 460 KB of it OpenSSL's alone. An idle segue maps none of
them; one with federation loads libcurl for its hRPC client, and works
(test_federation makes real calls, test_store_pg uses libpq, test_net,
test_irc and test_xmpp_login connect over TLS); segue.crypto loads OpenSSL
with its first digest, not for base64 or random bytes."""
import hashlib
import os
import shutil
import signal
import subprocess
import unittest

from harness import tmpdir, write, free_port, run, LogTail, SEGUE

# Which of libssl and libcrypto the process maps, before and after each step.
CRYPTO_SCRIPT = """
local function mapped()
  local maps = io.open("/proc/self/maps"):read("a")
  return (maps:find("libssl.so", 1, true) and "ssl" or "-") .. " "
      .. (maps:find("libcrypto.so", 1, true) and "crypto" or "-")
end
print("start " .. mapped())
local crypto = require "segue.crypto"
print("required " .. mapped())
print("base64 " .. crypto.base64_encode(crypto.random(3)):len() .. " " .. mapped())
print("sha256 " .. crypto.hex(crypto.sha256("segue")) .. " " .. mapped())
"""


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
        for lib in ("libcurl", "libpq", "libgnutls", "libkrb5", "libldap-2", "libssl",
                    "libcrypto"):
            self.assertNotIn(lib, libs)

    def test_federation_loads_libcurl_when_it_starts(self):
        port = free_port()
        libs = self.start('backends = {}\nserver_id = "localhost:%d"\nlisten = "127.0.0.1:%d"\n' % (port, port),
                          "running with 0 backend(s)")
        self.assertIn("libcurl", libs)
        self.assertNotIn("libpq", libs)


    def test_segue_crypto_loads_openssl_with_its_first_digest(self):
        write(os.path.join(self.d, "crypto.lua"), CRYPTO_SCRIPT)
        r = run(["exec", "crypto.lua"], cwd=self.d)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertEqual(r.stdout.splitlines(), [
            "start - -", "required - -", "base64 4 - -",
            "sha256 %s ssl crypto" % hashlib.sha256(b"segue").hexdigest()])


if __name__ == "__main__":
    unittest.main()
