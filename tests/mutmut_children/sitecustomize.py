"""Loaded by every Python a test starts while mutmut measures (tests/mutmut_children/__init__.py
puts this folder on the children's PYTHONPATH).

While mutmut collects which tests run which functions (MUTANT_UNDER_TEST=stats), its trampoline
records each call in the process that makes it, and a child's records die with the child. Here
each function a child runs is appended at once to the file the test names (a child may be
killed with SIGKILL, so nothing waits for its exit); the test's process adds them to its own.

A module run as a program (`python -m elt.processes`, the watchdog) is named `__main__` there,
and the trampoline only runs a mutant of the module it names: here the active mutant's module
name is translated to `__main__` in such a process, and its records back to the module's name.
"""

import os
import sys

_hits_file = os.environ.get("MUTMUT_CHILD_HITS")


def _main_module_name() -> str | None:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else None


if "MUTANT_UNDER_TEST" in os.environ:
    from mutmut.mutation import trampoline

    _mutant_under_test = trampoline.get_mutant_under_test

    def _mutant_under_test_here() -> str:
        name = _mutant_under_test()
        module, _, mutant = name.rpartition(".")
        return f"__main__.{mutant}" if module and module == _main_module_name() else name

    trampoline.get_mutant_under_test = _mutant_under_test_here

if os.environ.get("MUTANT_UNDER_TEST") == "stats" and _hits_file:
    _recorded: set[str] = set()

    def _record(name: str, caller: str | None = None) -> None:
        module, _, function = name.partition(".")
        if module == "__main__":
            name = f"{_main_module_name()}.{function}"
        if name in _recorded:
            return
        _recorded.add(name)
        hits = os.open(_hits_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(hits, f"{name}\n".encode())  # one short O_APPEND write: whole lines even with several children
        finally:
            os.close(hits)

    trampoline.record_trampoline_hit = _record
