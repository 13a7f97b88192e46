#!/usr/bin/env python3
"""A backend of the flubber protocol written in another language, for the
integration tests. It answers requests; the room name of a RoomLookup picks a
misbehaviour, so one backend process can be driven through every case:

  #ok          answer RoomID "!ok"
  #split       answer byte by byte, with pauses, no newline
  #pretty      answer pretty-printed over several lines
  #twice       an Update and the answer in one write, back to back
  #slow        never answer (the host's time-out fires)
  #retry-N     answer Error retry=true until the N-th try, then RoomID
  #fail        answer Error retry=false
  #crash       exit with status 3 without answering
  #garbage     write bytes that cannot start a JSON value
  #badjson     write a value that is not valid JSON
  #wrong       answer with the wrong variant (Room instead of RoomID)
  #unknownseq  answer a sequence number that is not in flight, then RoomID
  #env         answer with the value of $FAKE_VAR
  #cwd         answer with the working directory
  #pid         answer with the process id

Options (argv): --init=split|pretty|none|late|bad, --state=FILE (counts
starts, for restart tests), --stderr=TEXT (a line to log at start),
--stubborn=1 (ignore SIGTERM and the end of stdin: only SIGKILL ends it).
"""
import json
import os
import signal
import sys
import time

out = sys.stdout.buffer


def write(data, flush=True):
    out.write(data)
    if flush:
        out.flush()


def send(value, style="line"):
    text = json.dumps(value)
    if style == "line":
        write(text.encode() + b"\n")
    elif style == "split":
        for b in text.encode():
            write(bytes([b]))
            time.sleep(0.001)
    elif style == "pretty":
        write(json.dumps(value, indent=2).encode() + b"\n")
    elif style == "bare":
        write(text.encode())


def main():
    opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    if "stderr" in opts:
        sys.stderr.write(opts["stderr"] + "\n")
        sys.stderr.flush()
    if opts.get("stubborn"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "state" in opts:
        with open(opts["state"], "a") as f:
            f.write("start\n")
    init = {"backend_name": "fake", "backend_version": [1, 2, 3], "protocol_version": [0, 1, 0]}
    mode = opts.get("init", "line")
    if mode == "bad":
        init["protocol_version"] = [0, 2, 0]
        send(init)
    elif mode == "late":
        time.sleep(30)
    elif mode != "none":
        send(init, {"split": "split", "pretty": "pretty"}.get(mode, "line"))
    tries = {}
    buf = b""
    dec = json.JSONDecoder()
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            while opts.get("stubborn"):
                time.sleep(1)
            return 0
        buf += chunk
        while True:
            text = buf.decode().lstrip()
            if not text:
                buf = b""
                break
            try:
                req, end = dec.raw_decode(text)
            except ValueError:
                break
            buf = text[end:].encode()
            handle(req, tries, opts)


def answer(seq, body, style="line"):
    send({"sequence_number": seq, "body": body}, style)


def handle(req, tries, opts):
    seq, body = req["sequence_number"], req["body"]
    kind, value = body["type"], body.get("value")
    if kind == "MessageSend":
        answer(seq, {"type": "MessageID", "value": "msg-%d" % seq})
        return
    if kind == "RoomJoin":
        answer(seq, {"type": "Success", "value": None})
        return
    if kind != "RoomLookup":
        answer(seq, {"type": "Error", "value": {"message": "fake does not do " + kind}})
        return
    ok = {"type": "RoomID", "value": "!" + value.lstrip("#")}
    if value == "#ok":
        answer(seq, ok)
    elif value == "#split":
        answer(seq, ok, "split")
    elif value == "#pretty":
        answer(seq, ok, "pretty")
    elif value == "#twice":
        up = {"type": "RoomDelete", "value": "!gone"}
        write((json.dumps(up) + json.dumps({"sequence_number": seq, "body": ok})).encode())
    elif value == "#slow":
        pass
    elif value.startswith("#retry-"):
        need = int(value.split("-")[1])
        tries[value] = tries.get(value, 0) + 1
        if tries[value] < need:
            answer(seq, {"type": "Error", "value": {"message": "busy, try %d" % tries[value], "retry": True}})
        else:
            answer(seq, {"type": "RoomID", "value": "!after-%d" % tries[value]})
    elif value == "#fail":
        answer(seq, {"type": "Error", "value": {"message": "no such room", "retry": False}})
    elif value == "#crash":
        sys.exit(3)
    elif value == "#garbage":
        write(b"\n  xyz garbage\n")
    elif value == "#badjson":
        # balanced quotes, so the value ends and the parser (not the framer) fails
        write(b'{"sequence_number": 1, "body": {"type": "RoomID", "value" "x"}}\n')
    elif value == "#wrong":
        answer(seq, {"type": "Room", "value": {"id": "!r", "parent": None, "name": "r", "sendable": True}})
    elif value == "#unknownseq":
        answer(seq + 1000, ok)
        answer(seq, ok)
    elif value == "#env":
        answer(seq, {"type": "RoomID", "value": os.environ.get("FAKE_VAR", "")})
    elif value == "#cwd":
        answer(seq, {"type": "RoomID", "value": os.getcwd()})
    elif value == "#pid":
        answer(seq, {"type": "RoomID", "value": str(os.getpid())})
    else:
        answer(seq, ok)


if __name__ == "__main__":
    sys.exit(main())
