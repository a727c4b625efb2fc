"""Mutation testing of code that runs in the Python processes a test starts (elt.processes: the
guarded run and its watchdog are children of the test).

mutmut (3.8) imports the mutated copy (`mutants/src`) into the test's process only, and picks
the active mutant from the MUTANT_UNDER_TEST environment variable. Children inherit that variable
but would import `elt` from the editable install, the unmutated source. While mutmut runs, each
test's children therefore get the folders the test imported `elt` from first on PYTHONPATH, and
the functions they run count as run by the test (see sitecustomize.py here). Outside mutmut
nothing changes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _mutmut_active() -> bool:
    return "MUTANT_UNDER_TEST" in os.environ


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Around each test's call (mutmut's stats plugin reads the calls at teardown, so before it)."""
    if not _mutmut_active():
        yield
        return
    import elt

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
