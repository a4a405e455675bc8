"""What every benchmark prints first (the machine) and how it runs one measured command (wall time, peak RSS)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def machine() -> str:
    """One line: CPU model, cores, load, torch version and threads, GPU if any."""
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {model}, {os.cpu_count()} cores{' (AVX512-BF16)' if bf16 else ''}, load average {load}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}; python {platform.python_version()}")


@dataclass
class Measured:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str


def run_measured(args: list[str], *, env: dict | None = None) -> Measured:
    """Run `args`; return its wall seconds, its own peak resident memory (os.wait4's ru_maxrss, KiB on
    Linux) and its output."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, env={**os.environ, **(env or {})}, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(seconds, usage.ru_maxrss / 1024, proc.returncode, out.read(), err.read())


def check(m: Measured, what: str) -> Measured:
    if m.returncode != 0:
        sys.exit(f"{what} failed ({m.returncode}):\n{m.stderr[-3000:]}")
    return m


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(RssAnon, VmRSS) of `pid` and all its descendants, in MB (Linux /proc): anonymous memory (what the
    processes hold themselves) and all resident memory (also page cache of mapped files)."""
    anon = rss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    anon += int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return anon / 1024, rss / 1024


def run_tree_measured(args: list[str], *, env: dict | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run `args` (environment: ours updated by `env`); (wall seconds, peak resident memory of its whole process
    tree in MB, sampled every 0.2 s, data-loading workers included; the completed process)."""
    start, peak = time.perf_counter(), 0.0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=ROOT, env={**os.environ, **(env or {})})
        done = threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_memory_mb(proc.pid)[1])
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        done.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(args, proc.returncode, out.read(), err.read())
    return time.perf_counter() - start, peak, result
