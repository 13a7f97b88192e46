#!/usr/bin/env python3
"""fake_backend.py with more ways to fail, for test_faults.py. Every mode and
option of fake_backend.py works here too; this adds:

  #flood-N     start an Update and never finish it: N MiB of one string,
               no newline, then hang (a backend stuck in a runaway write)
  #closeout    close stdout and go on living, reading stdin, never answering

Options: --pidfile=FILE (the pid, written at start), --mark=FILE (the room
of each RoomLookup is appended as it arrives, so a test knows a request is
in flight before it does something to the process)."""
import os
import sys
import time

import fake_backend as fake

MIB = 1 << 20


def options():
    return dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)


def flood(mib):
    fake.write(b'{"type": "RoomDelete", "value": "', flush=False)
    chunk = b"x" * MIB
    for _ in range(mib):
        fake.write(chunk)
    hang()


def close_stdout():
    sys.stdout.flush()
    os.close(1)
    # Still alive and still reading (requests pile up unanswered) until
    # stdin ends, then gone like a normal backend.
    while os.read(0, 65536):
        pass
    sys.exit(0)


def hang():
    while True:
        time.sleep(1)


original_handle = fake.handle


def handle(req, tries, opts):
    body = req["body"]
    room = body.get("value") if body["type"] == "RoomLookup" else None
    if room and "mark" in opts:
        with open(opts["mark"], "a") as f:
            f.write(room + "\n")
    if room and room.startswith("#flood-"):
        flood(int(room.split("-")[1]))
    elif room == "#closeout":
        close_stdout()
    else:
        original_handle(req, tries, opts)


def main():
    opts = options()
    if "pidfile" in opts:
        with open(opts["pidfile"], "w") as f:
            f.write(str(os.getpid()))
    fake.handle = handle
    return fake.main()


if __name__ == "__main__":
    sys.exit(main())
