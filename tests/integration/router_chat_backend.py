#!/usr/bin/env python3
"""A chat service as a subprocess backend for the router tests: rooms are
their names, MessageSend stores the message and announces it as a
MessageUpsert (as a real service echoes), and users "speak" by appending
JSON lines {"room", "sender", "text"} or {"edit": id, "text"} or
{"delete": id} to the file given as argv[1]. Messages survive a restart
(kept in argv[1] + ".state"), as a real service keeps them."""
import base64
import json
import os
import select
import sys
import time

msgs = {}
counter = [0]


def send(v):
    sys.stdout.write(json.dumps(v) + "\n")
    sys.stdout.flush()


def now():
    return int(time.time() * 1000)


def save(path):
    with open(path + ".state", "w") as f:
        json.dump({"counter": counter[0], "msgs": msgs}, f)


def load(path):
    try:
        with open(path + ".state") as f:
            st = json.load(f)
    except FileNotFoundError:
        return
    counter[0] = st["counter"]
    msgs.update(st["msgs"])


SHARED = sys.argv[2] if len(sys.argv) > 2 else None  # a room log shared by processes


def upsert(m, share=True):
    send({"type": "MessageUpsert", "value": m})
    save(sys.argv[1])
    if SHARED and share:
        with open(SHARED, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "m": m}) + "\n")


def new_message(room, sender, content, extra=None):
    counter[0] += 1
    t = now()
    # ids stay unique across the processes sharing a room
    mid = "c%d-%d" % (os.getpid(), counter[0]) if SHARED else "c%d" % counter[0]
    m = {"id": mid, "sender": sender, "recipient": room, "attachments": [],
         "content": content, "create_time": t, "edit_time": t, "extra": extra}
    msgs[m["id"]] = m
    return m


def handle(req):
    seq, body = req["sequence_number"], req["body"]
    kind, value = body["type"], body.get("value")
    if kind == "RoomLookup":
        out = {"type": "RoomID", "value": value}
    elif kind == "RoomJoin":
        out = {"type": "Success", "value": None}
    elif kind == "MessageSend":
        m = new_message(value["recipient"], "bridge", value["content"], value.get("extra"))
        m["attachments"] = value.get("attachments", [])
        upsert(m)  # announced before the answer, as some services do
        out = {"type": "MessageID", "value": m["id"]}
    else:
        out = {"type": "Error", "value": {"message": "unsupported " + kind}}
    send({"sequence_number": seq, "body": out})


def inject(line):
    cmd = json.loads(line)
    if "edit" in cmd:
        m = msgs[cmd["edit"]]
        m["content"] = {"type": "Text", "value": cmd["text"]}
        m["edit_time"] = now() + 1
        upsert(m)
    elif "delete" in cmd:
        send({"type": "MessageDelete", "value": cmd["delete"]})
    else:
        m = new_message(cmd["room"], cmd["sender"], cmd.get("content") or {"type": "Text", "value": cmd["text"]})
        if cmd.get("attach"):
            m["attachments"] = [{"mime": "image/png",
                                 "data": base64.b64encode(b"x" * cmd["attach"]).decode()}]
        upsert(m)


class Follow:
    """The whole lines appended to a file since the last call: a line still
    being written (no newline yet) waits for its end."""

    def __init__(self, path):
        self.f, self.rest = open(path), ""

    def lines(self):
        self.rest += self.f.read()
        *done, self.rest = self.rest.split("\n")
        return done


def main():
    path = sys.argv[1]
    open(path, "a").close()
    load(path)
    f = Follow(path)
    shared = None
    if SHARED:
        open(SHARED, "a").close()
        shared = Follow(SHARED)
    init = {"backend_name": "chat", "backend_version": [0, 1, 0], "protocol_version": [0, 1, 0]}
    if os.environ.get("CHAT_CAPABILITIES"):  # segue's InitInfo extension
        init["capabilities"] = json.loads(os.environ["CHAT_CAPABILITIES"])
    send(init)
    dec, buf = json.JSONDecoder(), ""
    while True:
        r, _, _ = select.select([0], [], [], 0.02)
        if r:
            chunk = os.read(0, 65536)
            if not chunk:
                return
            buf += chunk.decode()
            while buf.strip():
                try:
                    v, end = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                handle(v)
        for line in f.lines():
            if line.strip():
                inject(line)
        for line in (shared.lines() if shared else []):
            if not line.strip():
                continue
            other = json.loads(line)
            if other["pid"] != os.getpid():  # said through another process
                msgs[other["m"]["id"]] = other["m"]
                upsert(other["m"], share=False)


main()
