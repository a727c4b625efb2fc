"""Mutation testing of code that runs in the Python processes a test starts (elt.processes: the
guarded run and its watchdog are children of the test).

mutmut (3.8) imports the mutated copy (`mutants/src`) into the test's process only, and picks
the active mutant from the MUTANT_UNDER_TEST environment variable. Children inherit that variable
but would import `elt` from the editable install, the unmutated source. While mutmut runs, each
test's children therefore get the folders the test imported `elt` from first on PYTHONPATH, and
the functions they run count as run by the test (see sitecustomize.py here). Outside mutmut
nothing changes.

While mutmut runs, each test's process is also a child subreaper (Linux) during the test's call:
a process the test orphans (it kills a guarded parent to see the watchdog clean up) is
re-parented to the test's process, as it would be to PID 1 outside mutmut, rather than to
tests/mutation.py, which kills whatever reaches it as left behind by a worker mutmut killed.
When the call ends, whatever the test's process gained during it and still has (adopted
orphans, running or not yet reaped, and children the test left) is killed and reaped: mutmut
waits for any child of its own process, and must meet none but its workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _mutmut_active() -> bool:
    return "MUTANT_UNDER_TEST" in os.environ


def _subreaper(on: bool) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _children() -> set[int]:
    pids: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                pids |= {int(child) for child in (task / "children").read_text().split()}
    return pids


def _end_gained(before: set[int]) -> None:
    """SIGKILL and reap every child gained since `before`; what they had comes up to this
    process (still a subreaper) and goes the next round."""
    while gained := _children() - before:
        for pid in gained:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in gained:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Around each test's call (mutmut's stats plugin reads the calls at teardown, so before it)."""
    if not _mutmut_active():
        yield
        return
    import elt

    before = _children()
    _subreaper(True)
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "MUTMUT_CHILD_HITS")}
    handle, hits = tempfile.mkstemp(prefix="mutmut-child-hits-")
    os.close(handle)
    # `elt` is a namespace package: its folders, in the order this process searches them.
    imported_from = [str(Path(folder).resolve().parent) for folder in elt.__path__]
    os.environ["PYTHONPATH"] = os.pathsep.join([*imported_from, str(HERE), *filter(None, [saved["PYTHONPATH"]])])
    os.environ["MUTMUT_CHILD_HITS"] = hits
    try:
        yield
    finally:
        _end_gained(before)
        _subreaper(False)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        names = Path(hits).read_text().split()
        os.unlink(hits)
        if names and os.environ.get("MUTANT_UNDER_TEST") == "stats":
            from mutmut.stats import record_trampoline_hit

            for name in set(names):
                record_trampoline_hit(name)
