"""Starts a grandchild, writes both pids to argv[1], then behaves as argv[2] says.

modes: 'orphan' the grandchild outlives us (we exit 0 at once);
       'stubborn' both ignore SIGTERM and sleep; 'wait' we sleep until killed.
"""

import os
import signal
import sys
import time

path, mode = sys.argv[1], sys.argv[2]
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    if mode == "orphan":
        time.sleep(0.3)  # let our parent exit: we are an orphan now
        with open(path + ".ppid", "w") as f:
            f.write(str(os.getppid()))
    time.sleep(60)
    os._exit(0)
# Written whole and renamed into place: a reader that sees the file sees both pids.
with open(path + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {pid}\n")
os.replace(path + ".tmp", path)
if mode == "orphan":
    sys.exit(0)
time.sleep(60)
