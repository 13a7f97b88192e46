#!/usr/bin/env python3
"""A backend that sends its InitInfo and then never reads stdin (for the
overload tests): whatever the host writes stays in the pipe."""
import json
import sys
import time

sys.stdout.write(json.dumps({"backend_name": "stuck", "backend_version": [1, 0, 0],
                             "protocol_version": [0, 1, 0]}) + "\n")
sys.stdout.flush()
time.sleep(600)
