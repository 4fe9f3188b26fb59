"""Records every signal it receives, one name per line, in the file given as argv[1].

With `--spawn-grandchild FILE2`, first starts another recorder (same process group)
writing to FILE2. Writes 'ready' once its handlers are installed; exits 0 on SIGTERM.
"""

import os
import signal
import subprocess
import sys
import time

out = open(sys.argv[1], "a", buffering=1)  # noqa: SIM115 - open for the whole run
if len(sys.argv) > 3 and sys.argv[2] == "--spawn-grandchild":
    subprocess.Popen([sys.executable, __file__, sys.argv[3]])

SKIP = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}


def record(sig: int, _frame: object) -> None:
    out.write(signal.Signals(sig).name + "\n")
    if sig == signal.SIGTERM:
        os._exit(0)


for s in signal.Signals:
    if s not in SKIP and s < signal.SIGRTMIN:
        signal.signal(s, record)
out.write("ready\n")
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
sys.exit(9)
