"""Issue 12 (security and overload), the host's half: every attack here is
reproduced against the real segue binary and must leave it running.
docs/hardening.md has the table: attack, defence, what each test measures."""
import json
import os
import shutil
import unittest

from harness import run_lua, PYTHON, HERE

DEEP = os.path.join(HERE, "deep_backend.py")


def deep(depth, extra="max_depth = 300, restart_backoff_ms = 50"):
    return """
        local depths = {}
        segue.on("update", function(name, u)
          local d, x = 0, u.value.extra
          while type(x) == "table" do d, x = d + 1, x.x end
          depths[#depths + 1] = d + 1
        end)
        assert(segue.add_backend("deep", { cmd = %s, args = { %s, "%d" }, %s }))
        out(lookup("deep", "#ok"))
        segue.wait(300)
        out({ depths = depths, info = segue.backend("deep"):info() })
    """ % (json.dumps(PYTHON), json.dumps(DEEP), depth, extra)


class DeepValues(unittest.TestCase):
    """Item 1: a backend setting (max_depth = 300) and an Update nested 200
    deep used to abort segue (a raise outside any protected call)."""

    def test_an_update_deeper_than_lua_follows_is_a_violation_not_an_abort(self):
        r = run_lua(deep(200), timeout=60)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertNotIn("PANIC", r.stderr)
        self.assertIn("max_depth 300 capped to 128", r.stderr)
        self.assertIn("nests deeper than 128 levels", r.stderr)
        lookup, state = r.values()
        self.assertEqual(lookup["body"], {"type": "RoomID", "value": "!ok"}, r.stderr)
        self.assertEqual(state["depths"], [])
        self.assertGreaterEqual(state["info"]["restarts"], 1)

    def test_an_update_as_deep_as_the_cap_arrives_whole(self):
        r = run_lua(deep(120), timeout=60)
        self.assertEqual(r.code, 0, r.stderr)
        lookup, state = r.values()
        self.assertEqual(lookup["body"]["value"], "!ok")
        self.assertEqual(state["depths"], [120])
        self.assertEqual(state["info"]["restarts"], 0)

    def test_json_decode_reports_too_deep_instead_of_raising(self):
        r = run_lua("""
            local v, err = json.decode(("["):rep(200) .. ("]"):rep(200))
            out({ v = v == nil, err = err })
        """)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertEqual(r.values()[0], {"v": True, "err": "JSON nested deeper than 128 levels"})


if __name__ == "__main__":
    unittest.main()
