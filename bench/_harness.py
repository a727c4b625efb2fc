"""Shared by the benchmarks: run a command, measure its wall time and the peak memory of its process tree."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "bench" / "out"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_mb: float
    return_code: int
    timed_out: bool = False
    # Proportional set size summed over the tree: each page shared by n processes (a forked
    # worker's inherited pages, shared libraries) counts 1/n in each, so the sum is what the
    # tree holds. The RSS sum (peak_mb) counts such a page once per process that maps it.
    peak_pss_mb: float = 0.0


def measure(
    command: list[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    timeout: float | None = None,
) -> Measurement:
    """Wall time and peak memory summed over the process and all its children, as RSS and as PSS (sampled every 20 ms).

    A process tree still running after `timeout` seconds is killed; its Measurement says `timed_out`."""
    output = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - the log file outlives this function: the process writes to it
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
    root = psutil.Process(process.pid)
    peak = peak_pss = 0
    timed_out = False
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            memory = [_memory(member) for member in tree]
            peak = max(peak, sum(rss for rss, _ in memory))
            peak_pss = max(peak_pss, sum(pss for _, pss in memory))
        except psutil.NoSuchProcess:
            pass
        if timeout is not None and time.monotonic() - started > timeout:
            timed_out = True
            _kill_tree(root)
            process.wait()
            break
        time.sleep(0.02)
    seconds = time.monotonic() - started
    if log:
        output.close()
    return Measurement(
        round(seconds, 2), round(peak / 2**20, 1), process.returncode, timed_out, peak_pss_mb=round(peak_pss / 2**20, 1)
    )


def _kill_tree(root: psutil.Process) -> None:
    """SIGTERM to the process and its descendants, SIGKILL to those still there after 10 s."""
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in tree:
        with suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for member in alive:
        with suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=10)


def _memory(process: psutil.Process) -> tuple[int, int]:
    """(RSS, PSS) in bytes; (0, 0) for a process gone meanwhile."""
    try:
        full = process.memory_full_info()
    except psutil.NoSuchProcess:  # a zombie's ZombieProcess included
        return 0, 0
    return full.rss, full.pss


def machine() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{time.strftime('%Y-%m-%d')}, commit {commit}, {platform.machine()} with {os.cpu_count()} cores and "
        f"{memory:.0f} GiB, Python {platform.python_version()}"
    )


@contextmanager
def prefect_server(startup_seconds: float = 120) -> Iterator[str]:
    """A local `prefect server start` (SQLite) for the duration of a benchmark; yields its API URL."""
    home = OUT / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115 - the log file outlives this function: the process writes to it
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + startup_seconds
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.terminate()
            raise RuntimeError(f"prefect server did not start; see {home / 'server.log'}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table, as pasted into docs/benchmarks.md."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
