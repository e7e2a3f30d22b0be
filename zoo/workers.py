"""Worker processes for the sweeps that train many small models at once (scaling, STAR).

Spawned, not forked (torch and its thread pools do not survive a fork well), and on Linux each
worker asks the kernel to kill it when its parent dies: `kill PID` of a sweep stops its training
workers too, instead of leaving them running as orphans (Ctrl-C already reaches the whole
process group).

A spawned worker first re-imports the parent's main module (for `zoo`, the lazy CLI: a fraction
of a second) and only then runs `_init_worker`, its first own instruction. A parent that dies in
between is caught there: the worker compares its parent's PID with the one it was started by and
exits if they differ, so no worker outlives its parent by more than its start-up.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _init_worker(parent: int) -> None:
    if sys.platform.startswith("linux"):
        # Without prctl (an unusual libc) orphans stay possible; nothing else changes.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """A pool of `workers` spawned processes that end when this process ends."""
    return concurrent.futures.ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(os.getpid(),),
    )
