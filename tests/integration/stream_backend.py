#!/usr/bin/env python3
"""A chat backend whose chat service lives in files, so it outlives the
backend process (as a real service outlives a bridge that restarts):
  --in=FILE   lines {"id", "text", "t"} said in --room, followed as the file
              grows; a new process says them all again from the start, as a
              service replays its history on reconnect
  --out=FILE  every MessageSend the bridge makes, appended as a JSON line
              {"origin": extra.segue_origin, "content": content}
  --room=R    the room (default #s)
"""
import json
import os
import sys
import threading
import time

opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
IN, OUT, ROOM = opts.get("in"), opts.get("out"), opts.get("room", "#s")
lock = threading.Lock()
joined = threading.Event()


def send(v):
    with lock:
        sys.stdout.write(json.dumps(v) + "\n")
        sys.stdout.flush()


def say():
    joined.wait()
    pos, buf = 0, ""
    while True:
        if IN and os.path.exists(IN):
            with open(IN) as f:
                f.seek(pos)
                data = f.read()
                pos = f.tell()
            buf += data
            while "\n" in buf:
                line, buf = buf.split("\n", 1)
                m = json.loads(line)
                send({"type": "MessageUpsert", "value": {
                    "id": m["id"], "sender": "u", "recipient": ROOM, "attachments": [],
                    "content": {"type": "Text", "value": m["text"]},
                    "create_time": m["t"], "edit_time": m["t"]}})
        time.sleep(0.02)


def main():
    send({"backend_name": "stream", "backend_version": [0, 0, 1], "protocol_version": [0, 1, 0]})
    threading.Thread(target=say, daemon=True).start()
    n = 0
    for line in sys.stdin:
        req = json.loads(line)
        seq, body = req["sequence_number"], req["body"]
        t = body.get("type")
        if t == "RoomLookup":
            reply = {"type": "RoomID", "value": body["value"]}
        elif t == "RoomJoin":
            reply = {"type": "Success", "value": None}
            if body["value"] == ROOM:
                joined.set()
        elif t == "MessageSend":
            v = body["value"]
            if OUT:
                with open(OUT, "a") as f:
                    f.write(json.dumps({"origin": (v.get("extra") or {}).get("segue_origin"),
                                        "content": v.get("content")}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            n += 1
            reply = {"type": "MessageID", "value": "c%d.%d" % (os.getpid(), n)}
        else:
            reply = {"type": "Success", "value": None}
        send({"sequence_number": seq, "body": reply})


if __name__ == "__main__":
    main()
