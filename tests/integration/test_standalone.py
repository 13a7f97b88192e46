"""`segue backend FILE.lua`: a Lua backend speaking the protocol on its own
stdin/stdout, for any host of the protocol, and segue hosting it."""
import json
import os
import subprocess
import unittest

from harness import SEGUE, run, run_lua, tmpdir, write

SRC = os.environ.get("SEGUE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
MEMORY = os.path.join(SRC, "backends", "memory.lua")


def session(requests, args=(), raw=None):
    data = raw if raw is not None else "".join(json.dumps(r) + "\n" for r in requests).encode()
    p = subprocess.run([SEGUE, "backend", MEMORY] + list(args), input=data,
                       capture_output=True, timeout=30)
    lines = p.stdout.decode().splitlines()
    return p, [json.loads(x) for x in lines]


class Standalone(unittest.TestCase):
    def test_init_info_comes_first_then_one_response_per_request_each_on_its_line(self):
        p, values = session([
            {"sequence_number": 7, "body": {"type": "RoomLookup", "value": "#general"}},
            {"sequence_number": 8, "body": {"type": "RoomLookup", "value": "#general"}},
            {"sequence_number": 9, "body": {"type": "MessageGet", "value": "nope"}},
        ], ["user=alice"])
        self.assertEqual(p.returncode, 0, p.stderr)
        caps = values[0].pop("capabilities")  # segue's InitInfo extension
        self.assertEqual(values[0], {"backend_name": "memory", "backend_version": [0, 1, 0],
                                     "protocol_version": [0, 1, 0]})
        self.assertTrue(caps["history"])
        responses = {v["sequence_number"]: v["body"] for v in values if "sequence_number" in v}
        self.assertEqual(responses[7]["type"], "RoomID")
        self.assertEqual(responses[7], responses[8])
        self.assertEqual(responses[9]["type"], "Error")
        self.assertIn("no message with id nope", responses[9]["value"]["message"])
        # the room creation was announced as an update
        self.assertIn({"type": "RoomUpsert", "value": {"id": responses[7]["value"], "parent": None,
                                                       "name": "#general", "sendable": True}}, values)

    def test_options_from_the_command_line_reach_the_backend(self):
        p, values = session([
            {"sequence_number": 1, "body": {"type": "RoomLookup", "value": "#a"}},
        ] + [{"sequence_number": 2, "body": {"type": "MessageSend", "value": {
            "recipient": "PLACEHOLDER", "attachments": [], "content": {"type": "Text", "value": "x"}}}}],
            ["user=alice"])
        # #a's id is not known in advance: the MessageSend above goes to a user (a DM)
        ups = [v for v in values if v.get("type") == "MessageUpsert"]
        self.assertEqual(ups[0]["value"]["sender"], "alice")

    def test_requests_split_pretty_and_without_newlines_are_read(self):
        raw = (b'{"sequence_number": 1, "body": {"type": "RoomLookup", "value": "#a"}}'
               b'{"sequence_number": 2,\n "body": {\n  "type": "RoomLookup",\n  "value": "#b"\n }\n}')
        p, values = session(None, raw=raw)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(sorted(v["sequence_number"] for v in values if "sequence_number" in v), [1, 2])

    def test_the_seed_example_session_malformed_line_is_refused_with_its_offset(self):
        good = b'{"sequence_number": 0, "body": {"type": "RoomLookup", "value": "#general"}}\n'
        bad = (b'{"sequence_number": 2, "body": {"type": "MessageSend", "value": {"recipient": '
               b'"#general", "attachments": [], "content": {"type": "Text", "value: "Hello, world!"}, '
               b'"extra": null}}}\n')
        p, values = session(None, raw=good + bad)
        self.assertEqual(p.returncode, 1)
        self.assertEqual(values[0]["backend_name"], "memory")
        self.assertEqual([v["sequence_number"] for v in values if "sequence_number" in v], [0])
        # the odd quote swallows the rest: the stream ends inside that value
        self.assertIn("stream ended inside a value that started at byte offset %d" % len(good),
                      p.stderr.decode())

    def test_an_invalid_request_is_refused_naming_the_field(self):
        p, values = session(None, raw=b'{"sequence_number": 1, "body": {"type": "RoomBlink", "value": 1}}\n')
        self.assertEqual(p.returncode, 1)
        self.assertIn('Request.body.type: unknown variant \\"RoomBlink\\"', p.stderr.decode())

    def test_segue_hosts_a_standalone_segue_backend(self):
        r = run_lua("""
            assert(segue.add_backend("sub", { cmd = %s, args = { "backend", %s, "user=bob" } }))
            out(segue.await(function()
              local room = segue.backend("sub"):request { type = "RoomLookup", value = "#x" }
              return segue.backend("sub"):request { type = "MessageSend", value = {
                recipient = room.value, content = { type = "Text", value = "hi" } } }
            end))
            out(segue.backend("sub"):info())
        """ % (json.dumps(SEGUE), json.dumps(MEMORY)))
        sent, info = r.values()
        self.assertEqual(sent["type"], "MessageID", r.stderr)
        self.assertEqual(info["kind"], "process")


if __name__ == "__main__":
    unittest.main()
