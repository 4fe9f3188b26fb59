"""Orphans one grandchild that records its new parent's pid in argv[1], then exits.

The main process stays alive for argv[2] seconds, so the orphan is reaped by
whoever adopted it, not by the kernel tearing things down.
"""

import os
import sys
import time

path, linger = sys.argv[1], float(sys.argv[2])
pid = os.fork()
if pid == 0:
    if os.fork() == 0:
        time.sleep(0.2)
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getppid()))
        os.rename(path + ".tmp", path)
        time.sleep(0.3)
        os._exit(0)
    os._exit(0)
os.waitpid(pid, 0)
time.sleep(linger)
