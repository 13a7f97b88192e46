#!/usr/bin/env python3
"""A chat backend whose chat service lives in files, so it outlives the
backend process (as a real service outlives a bridge that restarts):
  --in=FILE   lines {"id", "text", "t"} said in --room, followed as the file
              grows; a new process says them all again from the start, as a
              service replays its history on reconnect
  --out=FILE  every MessageSend the bridge makes, appended as a JSON line
              {"origin": extra.segue_origin, "content": content, "id": the
              copy's id}; a new process announces them all again (with their
              ids and `extra`) once the bridge joined the room, as a service
              replays its history, copies included, on reconnect
  --reply-ms=N  answer each MessageSend N ms after it is posted (a slow
              service: the copy exists before the bridge learns its id),
              then append {"answered": id} to the --out file
  --room=R    the room (default #s)
"""
import json
import os
import sys
import threading
import time

opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
IN, OUT, ROOM = opts.get("in"), opts.get("out"), opts.get("room", "#s")
REPLY_S = int(opts.get("reply-ms", "0")) / 1000.0
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


def answer(seq, reply, cid):
    try:
        send({"sequence_number": seq, "body": reply})
    except OSError:  # the bridge is gone: this copy was never answered
        return
    with lock, open(OUT, "a") as f:
        f.write(json.dumps({"answered": cid}) + "\n")


def replay_out():
    """The copies posted before this process started, as the service shows
    its history: each with the id it was given and its extra."""
    if not OUT or not os.path.exists(OUT):
        return
    with open(OUT) as f:
        lines = [l for l in f if l.endswith("\n")]
    for i, line in enumerate(lines):
        c = json.loads(line)
        if "id" not in c or "origin" not in c:
            continue
        send({"type": "MessageUpsert", "value": {
            "id": c["id"], "sender": "bridge", "recipient": ROOM, "attachments": [],
            "content": c["content"], "create_time": i, "edit_time": i,
            "extra": {"segue_origin": c["origin"]}}})


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
            if body["value"] == ROOM and not joined.is_set():
                joined.set()
                replay_out()
        elif t == "MessageSend":
            v = body["value"]
            n += 1
            cid = "c%d.%d" % (os.getpid(), n)
            if OUT:
                with lock, open(OUT, "a") as f:
                    f.write(json.dumps({"origin": (v.get("extra") or {}).get("segue_origin"),
                                        "content": v.get("content"), "id": cid}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            reply = {"type": "MessageID", "value": cid}
            if REPLY_S:  # answered later, while the next requests are read
                threading.Timer(REPLY_S, answer, (seq, reply, cid)).start()
                continue
        else:
            reply = {"type": "Success", "value": None}
        send({"sequence_number": seq, "body": reply})


# ---- for the tests that drive it (test_scaling, test_replay) ----------------

def user_says(path, mid):
    """A user of the --in service says message `mid` ("m001": time 1001)."""
    with open(path, "a") as f:
        f.write(json.dumps({"id": mid, "text": "hello " + mid, "t": 1000 + int(mid[1:])}) + "\n")


def users_say_until(path, ids, killed, after=50, most=2000):
    """One message every 10 ms, on until `after` of them were said after
    `killed` is set (so copies are in flight at a kill); `ids` grows with
    what was said."""
    n = 0
    while n < after and len(ids) < most:
        mid = "m%03d" % len(ids)
        user_says(path, mid)
        ids.append(mid)
        if killed.is_set():
            n += 1
        time.sleep(0.01)


def out_lines(path):
    """What the --out service holds: copies and answers (whole lines only)."""
    from harness import whole_lines
    return [json.loads(line) for line in whole_lines(path)]


def bridged(path):
    """The origin ids of the copies the --out service received, in order."""
    return [c["origin"]["id"] for c in out_lines(path) if "origin" in c]


if __name__ == "__main__":
    main()
