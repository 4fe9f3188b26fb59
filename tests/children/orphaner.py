"""Orphans N short-lived grandchildren (double fork), then reports zombies and exits.

argv: N REPORT_FILE EXIT_CODE. While still running, it counts zombie processes in
/proc (inside a PID namespace these are the namespace's) and writes the count.
"""

import os
import sys
import time

n, report, code = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        if os.fork() == 0:
            time.sleep(0.05)  # outlive our parent, then exit as an orphan
            os._exit(0)
        os._exit(0)
    os.waitpid(pid, 0)


def zombies() -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    count += f.read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                pass
    return count


time.sleep(0.5)  # all grandchildren have exited by now
deadline = time.monotonic() + 5
while zombies() and time.monotonic() < deadline:
    time.sleep(0.05)
with open(report, "w") as f:
    f.write(f"{zombies()} {os.getpid()}\n")
sys.exit(code)
