"""Worker processes for the sweeps that train many small models at once (scaling, STAR).

Spawned, not forked (torch and its thread pools do not survive a fork well), and on Linux each
worker asks the kernel to kill it when its parent dies: `kill PID` of a sweep stops its training
workers too, instead of leaving them running as orphans (Ctrl-C already reaches the whole
process group).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _init_worker() -> None:
    if sys.platform.startswith("linux"):
        # Without prctl (an unusual libc) orphans stay possible; nothing else changes.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """A pool of `workers` spawned processes that end when this process ends."""
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
    )
