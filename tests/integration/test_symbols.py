"""libsegue.so exports exactly the functions segue.h declares with SG_EXTERN:
everything else (the layers' internals, protobuf-c's generated code, the
embedded scripts) is hidden, so embedders cannot come to depend on it."""
import os
import re
import subprocess
import unittest

SOURCE = os.environ.get("SEGUE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY = os.environ.get("SEGUE_BINARY_DIR", os.path.join(SOURCE, "build"))


def declared():
    with open(os.path.join(SOURCE, "runtime", "include", "segue.h")) as f:
        text = f.read()
    return set(re.findall(r"^SG_EXTERN [^;(]*?\b(sg_\w+)\(", text, re.M))


def exported(lib):
    out = subprocess.run(["nm", "-D", "--defined-only", lib], check=True,
                         capture_output=True, text=True).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "TDBRVW":
            names.add(parts[2])
    return names


class Symbols(unittest.TestCase):
    def test_exports_match_header(self):
        lib = os.path.join(BINARY, "libsegue.so")
        self.assertTrue(os.path.exists(lib), lib)
        want = declared()
        self.assertGreaterEqual(len(want), 20, "segue.h parsed badly")
        got = exported(lib)
        # _init/_fini and the like come from the toolchain, not from us.
        got = {n for n in got if not n.startswith("_")}
        self.assertEqual(sorted(got - want), [], "exported but not in segue.h")
        self.assertEqual(sorted(want - got), [], "in segue.h but not exported")

    def test_internal_names_use_the_internal_prefix(self):
        # libuv's rule: sg_ is the public API, sg__ everything else.
        public = declared()
        bad = []
        for root in ("runtime", "bindings"):
            for dirpath, _, files in os.walk(os.path.join(SOURCE, root)):
                for name in files:
                    # (hidden files: an editor's, not the build's)
                    if not name.endswith((".c", ".h")) or name == "segue.h" or name.startswith("."):
                        continue
                    with open(os.path.join(dirpath, name)) as f:
                        for n, line in enumerate(f, 1):
                            m = re.match(r"^(?:static )?[\w ]*?\*?\b(sg_[a-z]\w*)\(", line)
                            if m and m.group(1) not in public:
                                bad.append(f"{dirpath}/{name}:{n}: {m.group(1)}")
        self.assertEqual(bad, [])


if __name__ == "__main__":
    unittest.main()
