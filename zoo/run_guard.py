"""What keeps a training run safe from its surroundings: one process per run folder, and a
stop at a step boundary (with a checkpoint) when the scheduler sends SIGTERM or the user Ctrl-C.

    with RunLock(output_dir), StopSignals() as stop:
        for step in ...:
            ...
            if stop.requested:
                save a checkpoint, then raise TrainingStopped(...)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType, TracebackType

LOCK_FILE = ".lock"


class RunInUseError(RuntimeError):
    """Another live process holds the run folder; the message names its PID."""


class TrainingStopped(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; `signal` is its number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signal = signum


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """`output_dir/.lock`, created exclusively, holding this process's PID and host. A lock left
    by a process that no longer runs (on this host) is taken over; one held by a live process
    raises `RunInUseError`. `enabled=False` (non-main ranks) does nothing."""

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.enabled = enabled
        self.note = ""

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host == mine["host"] and not _alive(pid):
                    self.note = f"took over the lock of process {pid}, which no longer runs"
                    self.path.unlink(missing_ok=True)
                    continue
                if isinstance(pid, int):
                    raise RunInUseError(
                        f"{self.path.parent} is in use by process {pid} on {host} (since "
                        f"{holder.get('started', '?')}); wait for it, stop it, or choose another "
                        "output_dir"
                    ) from None
                raise RunInUseError(
                    f"{self.path}: a lock of unknown owner; delete it if no run uses "
                    f"{self.path.parent}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            return self
        raise RunInUseError(f"{self.path}: could not take the lock")  # pragma: no cover

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def __exit__(self, *exc: object) -> None:
        if self.enabled and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


class StopSignals:
    """Within the block, SIGTERM and SIGINT ask for a stop (`requested` holds the signal
    number) instead of killing the process; a second signal stops it at once. Outside the main
    thread (where Python cannot handle signals) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:  # asked twice: do what the signal does by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
