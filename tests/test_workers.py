"""Sweep workers end with their parent: a killed sweep leaves no orphan still training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

PARENT = textwrap.dedent(
    """
    import os, time
    from zoo.workers import process_pool

    if __name__ == "__main__":
        pool = process_pool(1)
        pid = pool.submit(os.getpid).result()
        pool.submit(time.sleep, 300)
        print(pid, flush=True)
        time.sleep(300)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited already
        return stat.read().split()[2] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_the_parent_ends_its_workers(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    assert _alive(worker)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the worker outlived its killed parent"


def _marked(marker: str) -> list[int]:
    """Live processes (not zombies) whose environment holds `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes() and _alive(int(proc.name)):
                found.append(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("kill_after", ["start", "first worker"])
def test_killing_a_sweep_early_leaves_no_worker(tmp_path, kill_after):
    """`zoo scaling run --workers 2` killed 0.5 s after it starts (or 0.5 s after its first
    worker appears, while workers are still starting): 5 s later no worker is alive."""
    from tests.scaling.test_plan import _sweep_file
    from zoo.scaling.sweep import plan_sweep

    plan_sweep(_sweep_file(tmp_path), tmp_path / "plan")
    marker = f"ZOO_SWEEP_TEST={uuid.uuid4().hex}"
    name, value = marker.split("=")
    zoo = Path(sys.executable).with_name("zoo")
    parent = subprocess.Popen(
        [str(zoo), "scaling", "run", str(tmp_path / "plan"), "--workers", "2", "--threads", "1"],
        env={**os.environ, name: value},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen = []
    if kill_after == "first worker":
        deadline = time.monotonic() + 60
        while not seen and time.monotonic() < deadline and parent.poll() is None:
            seen = [p for p in _marked(marker) if p != parent.pid]
            time.sleep(0.02)
        assert seen, "the sweep started no worker"
    time.sleep(0.5)
    assert parent.poll() is None, "the sweep ended before it could be killed"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    time.sleep(5)
    survivors = _marked(marker)
    for pid in survivors:  # leave nothing behind for the next test
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], f"{len(survivors)} process(es) outlived the killed sweep"
