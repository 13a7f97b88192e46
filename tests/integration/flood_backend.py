#!/usr/bin/env python3
"""A chat service for the router's load tests, speaking the backend protocol.
  flood_backend.py src N   once asked to RoomJoin "#go", says N messages
                           ("1".."N") in "#load" as fast as it can
  flood_backend.py dst F   answers MessageSends and appends each one's text
                           (the last Text of its content) as a line to F
Both answer RoomLookup (the room id is its name) and RoomJoin."""
import json
import sys

mode, arg = sys.argv[1], sys.argv[2]
out = sys.stdout
out.write(json.dumps({"backend_name": "flood", "backend_version": [0, 0, 1],
                      "protocol_version": [0, 1, 0]}) + "\n")
out.flush()
log = open(arg, "a", buffering=1) if mode == "dst" else None
sent = 0


def text(c):
    if c["type"] == "Text":
        return c["value"]
    if c["type"] == "Concat":
        return text(c["value"][-1])
    return ""


for line in sys.stdin:
    req = json.loads(line)
    seq, body = req["sequence_number"], req["body"]
    if body["type"] == "RoomLookup":
        answer = {"type": "RoomID", "value": body["value"]}
    elif body["type"] == "RoomJoin":
        answer = {"type": "Success", "value": None}
    elif body["type"] == "MessageSend":
        sent += 1
        log.write(text(body["value"]["content"]) + "\n")
        answer = {"type": "MessageID", "value": "copy%d" % sent}
    else:
        answer = {"type": "Error", "value": {"message": "not here", "retry": False}}
    out.write(json.dumps({"sequence_number": seq, "body": answer}) + "\n")
    out.flush()
    if mode == "src" and body["type"] == "RoomJoin" and body["value"] == "#go":
        for i in range(1, int(arg) + 1):
            out.write(json.dumps({"type": "MessageUpsert", "value": {
                "id": "m%d" % i, "sender": "u", "recipient": "#load", "attachments": [],
                "content": {"type": "Text", "value": str(i)}, "create_time": 1, "edit_time": 1}}) + "\n")
        out.flush()
