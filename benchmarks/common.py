"""Helpers every benchmark script shares: timing, device and version records, the load note,
and fla (flash-linear-attention), the optional baseline of the linear-mixer benchmarks.

The scripts run as `python benchmarks/<name>.py`, so this module imports as `common`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers

import zoo
from zoo.atomic import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(device: torch.device) -> None:
    """Create the CUDA context and cuBLAS handles, so no variant's first call pays for them."""
    if device.type == "cuda":
        x = torch.ones(64, 64, device=device)
        (x @ x).sum().item()


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of fn, synchronized on CUDA before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(repeats))


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages (Linux): other processes on the machine skew CPU timings."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def device_info(device: torch.device, threads: int) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "unknown CPU"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "type": device.type,
        "name": name,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "loadavg_start": loadavg(),
    }


def load_note(dev: dict[str, Any]) -> str:
    start, end = dev.get("loadavg_start"), dev.get("loadavg_end")
    if not start:
        return ""
    note = f"Load average (1 min) at start {start[0]:.2f}" + (
        f", at end {end[0]:.2f}" if end else ""
    )
    # Our own run adds about `threads` to the end figure.
    busy = start[0] > 1.0 or (end is not None and end[0] > dev["threads"] + 1.0)
    if dev["type"] == "cpu" and busy:
        note += (
            " — other processes were running: with every core in use, each multi-threaded op can"
            " wait a scheduler slice, so these timings are pessimistic and noisy"
        )
    return note + "\n"


def with_notes(lines: list[str], notes: list[str], dev: dict[str, Any]) -> str:
    """A benchmark's table text: its lines, its notes after a blank line, the load note."""
    note = load_note(dev)
    return "\n".join(lines + (["", *notes] if notes else [])) + ("\n" + note if note else "")


def versions() -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zoo": zoo.__version__,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def progress(message: str) -> None:
    """A line on stderr, at once: a run cut off on a lent GPU still says how far it got."""
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise TimeoutError in the block after `seconds` of wall time (SIGALRM, so the main thread of
    a POSIX process only; elsewhere, or with None, no limit). Python checks the alarm between
    bytecodes: a first call stuck compiling or autotuning Triton kernels stops at its next
    Python step, while one long CUDA kernel finishes first."""
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"over the time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _write(out_path: Path, data: dict[str, Any]) -> None:
    """Write the JSON, and a copy into $BENCH_COPY_DIR when set: on a lent GPU that is the
    machine's outbox, which returns a limited number of files (not the whole results folder)."""
    write_json_atomic(out_path, data)
    if copy_dir := os.environ.get("BENCH_COPY_DIR"):
        write_json_atomic(Path(copy_dir) / out_path.name, data)


def checkpoint(result: dict[str, Any], out_path: Path) -> None:
    """Write the result so far, marked partial: a run killed later keeps every finished row."""
    _write(out_path, {**result, "partial": True})


def finish(result: dict[str, Any], out_path: Path, table: Callable[[dict[str, Any]], str]) -> None:
    """Record the end load, print the table, write the JSON (whole, replacing any partial one)."""
    result["device"]["loadavg_end"] = loadavg()
    print(table(result))
    _write(out_path, result)
    print(f"wrote {out_path}")


def error_text(exc: BaseException, limit: int = 500) -> str:
    """A failed variant's record: the exception's type and message, cut to `limit` characters
    (Triton compile errors can run to pages)."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fla_version() -> str:
    """fla's version, "not installed", or why `import fla` failed (an optional baseline: its ops
    are Triton kernels for CUDA, installed with `pip install fla-core`)."""
    try:
        import fla
    except ImportError:
        return "not installed"
    except Exception as exc:  # a broken install (e.g. a triton mismatch) is a result too
        return f"import failed: {error_text(exc)}"
    return str(getattr(fla, "__version__", "unknown version"))


def fla_op(module: str, name: str) -> Callable[..., Any] | str:
    """fla.ops.<module>.<name>, or a string saying why it cannot be used."""
    version = fla_version()
    if version == "not installed" or version.startswith("import failed"):
        return f"fla {version}"
    try:
        return getattr(importlib.import_module(f"fla.ops.{module}"), name)
    except (ImportError, AttributeError) as exc:
        return f"fla {version} has no fla.ops.{module}.{name} ({error_text(exc, 200)})"


def new_result(
    benchmark: str,
    device: torch.device,
    threads: int,
    quick: bool,
    out: Path | None = None,
    suffix: str = "",
) -> tuple[dict[str, Any], Path]:
    """The record every result starts with, and where it goes:
    results/{cpu,gpu}_<benchmark>[_quick]<suffix>.json unless `out` says otherwise."""
    stem = ("gpu" if device.type == "cuda" else "cpu") + f"_{benchmark}"
    out_path = out or RESULTS / (stem + ("_quick" if quick else "") + suffix + ".json")
    result = {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "device": device_info(device, threads),
        "versions": versions(),
    }
    return result, out_path


def bench_parser(
    doc: str | None, repeats: int, quick_help: str, time_limit_s: float | None = None
) -> argparse.ArgumentParser:
    """The arguments of every benchmark: --device, --threads, --repeats, --quick, --out; with a
    `time_limit_s` default also --time-limit (seconds per implementation and mode)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    if time_limit_s is not None:
        parser.add_argument(
            "--time-limit",
            type=float,
            default=time_limit_s,
            help="seconds one implementation may take per mode, first call (compile, autotune) "
            "included, before it is recorded as timed out (default: %(default)s; 0: no limit)",
        )
    return parser


def measure_fwd_bwd(
    fn: Callable[[Any], torch.Tensor],
    x: dict[str, Any],
    grad: torch.Tensor,
    device: torch.device,
    repeats: int,
    time_limit_s: float | None = None,
    label: str = "",
) -> dict[str, dict[str, Any]]:
    """First call and steady-state time of fn(x) under no_grad and of fn(x).backward(grad).

    The leaves are the tensors of x that need grad. A mode that raises, or runs past
    `time_limit_s` (first call and timed calls together), is recorded with its error: a kernel
    that fails or hangs is a result of the run, not its end. On CUDA the peak memory is kept.
    Each mode's outcome goes to stderr as it lands, prefixed with `label`.
    """
    leaves = [t for t in x.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def clear() -> None:
        for t in leaves:
            t.grad = None

    def fwd() -> None:
        with torch.no_grad():
            fn(x)

    def fwd_bwd() -> None:
        clear()
        fn(x).backward(grad)

    out: dict[str, dict[str, Any]] = {}
    for mode, step in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with time_limit(time_limit_s):
                first = time_once(step, device)
                seconds = median_time(step, device, warmup=1, repeats=repeats)
        except Exception as exc:
            out[mode] = {"error": error_text(exc)}
            progress(f"{label} {mode}: {out[mode]['error']}")
            clear()
            if device.type == "cuda":
                sync(device)
                torch.cuda.empty_cache()
            continue
        out[mode] = {"first_call_s": first, "ms": 1e3 * seconds}
        progress(f"{label} {mode}: first call {first:.3g} s, then {1e3 * seconds:.4g} ms")
        if device.type == "cuda":
            out[mode]["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    clear()
    return out


def fwd_bwd_table(
    rows: list[dict[str, Any]],
    shape_keys: str,
    op_names: dict[str, str],
    rate: tuple[str, str, str],
) -> tuple[list[str], list[str]]:
    """(table lines, note lines) of `measure_fwd_bwd` rows: per shape, op and implementation,
    fwd and fwd+bwd ms, a rate column `rate` = (row key, header, format) and the first calls.
    Skipped variants and failed modes become notes under the table."""
    key, header, spec = rate
    lines = [
        f"| ({', '.join(shape_keys)}) | op | impl | fwd ms | fwd {header} | fwd+bwd ms "
        f"| fwd+bwd {header} | first call s (fwd / fwd+bwd) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    notes = []

    def cell(res: dict[str, Any]) -> tuple[str, str, str]:
        if "ms" not in res:
            return "error", "", ""
        return f"{res['ms']:.2f}", format(res[key], spec), f"{res['first_call_s']:.3g}"

    for row in rows:
        shape = f"({', '.join(str(row[k]) for k in shape_keys)})"
        what = f"{op_names[row['op']]} {row['impl']}"
        if "skipped" in row:
            notes.append(f"- {shape} {what}: skipped, {row['skipped']}")
            continue
        (f_ms, f_rate, f_first), (b_ms, b_rate, b_first) = cell(row["fwd"]), cell(row["fwd_bwd"])
        lines.append(
            f"| {shape} | {op_names[row['op']]} | {row['impl']} | {f_ms} | {f_rate} | {b_ms} "
            f"| {b_rate} | {f_first} / {b_first} |"
        )
        notes += [
            f"- {shape} {what} {mode}: {row[mode]['error']}"
            for mode in ("fwd", "fwd_bwd")
            if "error" in row[mode]
        ]
    return lines, notes
