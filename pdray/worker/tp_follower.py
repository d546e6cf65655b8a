"""`python -m pdray.worker.tp_follower HOST PORT RANK`: an offline engine's follower rank.

Started by TensorParallelGroup (pdray/worker/tp_group.py) with its token in PDRAY_TP_TOKEN. A
fresh interpreter that imports pdray, not the user's script. It ignores Ctrl-C (the terminal
sends it to the whole process group): rank 0 stops it, or it exits when rank 0's connection
closes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback

from pdray.worker.tp_group import follow


def main(argv: list[str]) -> int:
    host, port, rank = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {rank}] %(levelname)s %(message)s")
    token = os.environ.pop("PDRAY_TP_TOKEN")
    try:
        follow((host, int(port)), int(rank), token)
        return 0
    except BaseException:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # skip the interpreter's teardown: CUDA and NCCL destructors must not hold the exit
    os._exit(code)
