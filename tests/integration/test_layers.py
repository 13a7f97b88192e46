"""The build enforces the layers of docs/design.md: each folder compiles with
the include directories of the layers below it only, so an include across a
forbidden arrow does not compile. Checked by compiling a probe with the very
command the build uses for a file of each layer (compile_commands.json)."""
import json
import os
import shlex
import subprocess
import tempfile
import unittest

SOURCE = os.environ.get("SEGUE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY = os.environ.get("SEGUE_BINARY_DIR", os.path.join(SOURCE, "build"))

# layer: (a file of it, headers it may include, headers it must not reach)
LAYERS = {
    "base": ("runtime/base/log.c", ["log.h", "store.h", "segue.h"],
             ["<lua.h>", "backend.h", "federation.h", "net_tcp.h", "bindings.h", "host.h"]),
    "flubber": ("runtime/flubber/backend.c", ["backend.h", "log.h"],
                ["<lua.h>", "federation.h", "net_tcp.h", "bindings.h", "host.h"]),
    "net": ("runtime/net/net_tcp.c", ["net_tcp.h", "log.h"],
            ["<lua.h>", "backend.h", "federation.h", "bindings.h", "host.h"]),
    "harmony": ("runtime/harmony/federation.c", ["federation.h", "postbox.h", "log.h"],
                ["<lua.h>", "backend.h", "net_tcp.h", "bindings.h", "host.h"]),
    "web": ("runtime/web/http_server.c", ["http_server.h", "log.h", "<http_parser.h>"],
            ["<lua.h>", "backend.h", "federation.h", "net_tcp.h", "bindings.h", "host.h"]),
    "bindings": ("bindings/lua_json.c", ["bindings.h", "<lua.h>", "federation.h", "backend.h", "http_server.h"],
                 ["host.h"]),
    "cli": ("runtime/cli/main.c", ["cli.h", "segue.h"], ["<lua.h>", "bindings.h", "backend.h"]),
}


def commands():
    with open(os.path.join(BINARY, "compile_commands.json")) as f:
        return {os.path.relpath(e["file"], SOURCE): e for e in json.load(f)}


def probe(entry, header):
    """Compiles `#include header` with entry's flags; True when it compiles."""
    args = shlex.split(entry["command"]) if "command" in entry else list(entry["arguments"])
    src = os.path.join(SOURCE, entry["file"]) if not os.path.isabs(entry["file"]) else entry["file"]
    inc = header if header.startswith("<") else f'"{header}"'
    with tempfile.TemporaryDirectory(prefix="segue-layers-") as tmp:
        # The probe lives in a temporary folder (the source tree is not
        # written to); -iquote the real file's folder lets a quoted include
        # find that folder's headers the way the file itself does.
        probe_c = os.path.join(tmp, "probe.c")
        out = os.path.join(tmp, "probe.o")
        with open(probe_c, "w") as f:
            f.write(f"#include {inc}\nint sg__layer_probe(void);\nint sg__layer_probe(void) {{ return 0; }}\n")
        new = []
        skip = False
        for a in args:
            if skip:
                skip = False
                new.append(out)
                continue
            if a == "-o":
                skip = True
                new.append(a)
            elif os.path.abspath(os.path.join(entry["directory"], a)) == os.path.abspath(src):
                new += ["-iquote", os.path.dirname(src), probe_c]
            else:
                new.append(a)
        r = subprocess.run(new, cwd=entry["directory"], capture_output=True, text=True)
        return r.returncode == 0


class Layers(unittest.TestCase):
    def test_arrows(self):
        cmds = commands()
        for layer, (example, allowed, forbidden) in LAYERS.items():
            entry = cmds.get(example)
            self.assertIsNotNone(entry, f"{example} is not in compile_commands.json")
            for h in allowed:
                with self.subTest(layer=layer, include=h, expect="compiles"):
                    self.assertTrue(probe(entry, h), f"{layer} cannot include {h}")
            for h in forbidden:
                with self.subTest(layer=layer, include=h, expect="fails"):
                    self.assertFalse(probe(entry, h), f"{layer} can include {h}: the arrow leaks")


if __name__ == "__main__":
    unittest.main()
