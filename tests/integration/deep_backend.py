#!/usr/bin/env python3
"""A backend for the host-limit tests: a RoomLookup of "#deep" makes it send
a MessageUpsert whose `extra` nests DEPTH levels (argv[1]) before it answers;
every RoomLookup is answered with RoomID "!ok"."""
import json
import os
import sys

depth = int(sys.argv[1])
extra = "leaf"
for _ in range(depth - 1):
    extra = {"x": extra}
out = sys.stdout.buffer
init = {"backend_name": "deep", "backend_version": [1, 0, 0], "protocol_version": [0, 1, 0]}
msg = {"id": "m1", "sender": "s", "recipient": "#r", "attachments": [],
       "content": {"type": "Text", "value": "deep"}, "create_time": 1, "edit_time": 1,
       "extra": extra}
out.write(json.dumps(init).encode() + b"\n")
sys.setrecursionlimit(10000)
out.flush()
buf = b""
dec = json.JSONDecoder()
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        sys.exit(0)
    buf += chunk
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        if line.strip():
            req = json.loads(line)
            if req["body"].get("value") == "#deep":
                out.write(json.dumps({"type": "MessageUpsert", "value": msg}).encode() + b"\n")
            out.write(json.dumps({"sequence_number": req["sequence_number"],
                                  "body": {"type": "RoomID", "value": "!ok"}}).encode() + b"\n")
            out.flush()
