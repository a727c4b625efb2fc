"""`make mutation`: mutmut against the fast tests, one module at a time, the score per module.

Each module of `[tool.elt-mutation.modules]` (pyproject.toml) runs in a folder of its own under
`.mutation/` whose pyproject.toml is `[tool.mutmut]` plus that module and its tests, so one
mutant runs only the tests that hold the module's promises, and each module's results are kept
(a second run re-tests only the mutants not killed yet, against the tests as they are now). A benchmark, not a gate: see docs/testing.md.

    .venv/bin/python tests/mutation.py                  # every module, then the table
    .venv/bin/python tests/mutation.py src/elt/run_lock.py
    .venv/bin/python tests/mutation.py --report         # the table from the results kept
    .venv/bin/python tests/mutation.py --retry-timeouts src/elt/warehouse_snowflake.py   # timeouts re-tested too
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORK = REPO_ROOT / ".mutation"
MUTMUT = Path(sys.executable).parent / "mutmut"
# Linked into each module's folder: what mutmut copies into mutants/, where the tests run.
COPIED = ["src", "tests"]
KILLED = {1, 3, 37}  # a test failed, pytest broke, the type checker refused it
TIMEOUT = {24, -24, 36, 152, 255}  # the mutant made a test hang: killed by mutmut's timeout
PR_SET_CHILD_SUBREAPER = 36  # prctl(2)
SWEEP_SECONDS = 0.5


def _config() -> tuple[dict, dict[str, list[str]]]:
    document = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return document["tool"]["mutmut"], document["tool"]["elt-mutation"]["modules"]


def _timeout_constants() -> dict[str, float]:
    """Per module, mutmut's `timeout_constant` (seconds added to a mutant's estimated test time
    before the multiplier): where the tests share a server a session fixture starts (fakesnow),
    whose start the per-test estimate leaves out, so a mutant's whole run would be a "timeout"."""
    document = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return document["tool"]["elt-mutation"].get("timeout-constant", {})


def _toml(table: dict) -> str:
    """[tool.mutmut] with string, number, bool and list-of-string values (JSON spells them as TOML does)."""
    return "[tool.mutmut]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())


def folder_of(module: str) -> Path:
    return WORK / Path(module).stem


def basetemp(module: str) -> Path:
    """The tests' pytest --basetemp, one per checkout and module. pytest empties it when a run
    starts: two checkouts measuring the same module at once (the main one and a worktree) must
    not delete each other's test repositories in the middle of a run. Outside the checkout, so
    a test's temporary folders are inside no git repository."""
    return Path(tempfile.gettempdir()) / f"mutation-{REPO_ROOT.name}-{folder_of(module).name}"


def _link(link: Path, target: Path) -> None:
    """`link` → `target`; a link left pointing elsewhere (results copied from another checkout) is re-pointed."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target)


def run(module: str, tests: list[str], mutmut: dict, retry_timeouts: bool = False) -> None:
    folder = folder_of(module)
    folder.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        _link(folder / name, REPO_ROOT / name)
    # The tests read the rest of the repo (dbt/, airbyte/, setup.sh, .venv-fakesnow/...) from the
    # repo root they see: mutants/.
    (folder / "mutants").mkdir(exist_ok=True)
    for entry in REPO_ROOT.iterdir():
        if entry.name not in {*COPIED, ".mutation", ".git", "pyproject.toml"}:
            _link(folder / "mutants" / entry.name, entry)
    table = {
        **mutmut,
        **({"timeout_constant": _timeout_constants()[module]} if module in _timeout_constants() else {}),
        "only_mutate": [module],
        "pytest_add_cli_args": [*mutmut.get("pytest_add_cli_args", []), f"--basetemp={basetemp(module)}"],
        "pytest_add_cli_args_test_selection": tests,
    }
    (folder / "pyproject.toml").write_text(_toml(table))
    print(f"== {module}: {' '.join(tests)}", flush=True)
    # mutmut keeps a mutant's result; name every mutant not yet killed so new tests get their chance.
    # --retry-timeouts: the timeouts too (after a change of the timeout settings).
    retry = [name for name, code in statuses(module).items() if code not in KILLED | (set() if retry_timeouts else TIMEOUT)]
    if statuses(module) and not retry:
        return
    # One worker: the machine is shared (HELPERS.md).
    with _sweeping_orphans() as start:
        start([str(MUTMUT), "run", "--max-children", "1", *retry], folder)


# What a mutmut worker's tests start must not outlive the worker. mutmut ends a worker that
# hangs with SIGXCPU (and SIGKILL after): its tests' cleanup never runs, and what they started
# (a guarded Python, its watchdog in a session of its own, `sleep 900` trees) would go on running,
# re-parented to PID 1. So this process is a child subreaper (Linux): whatever loses its parent
# below it is re-parented to it instead, and is killed here with everything below it. Each test
# process is a subreaper too while mutmut runs (tests/mutmut_children/__init__.py): a process a
# test orphans on purpose (it kills a guarded parent to see the watchdog clean up) goes to the
# test, not here, so what only reaches this process is what a dead worker (or mutmut) left.


def _become_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                pids += [int(child) for child in (task / "children").read_text().split()]
    return pids


def _tree(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        for child in _children(pending.pop()):
            found.append(child)
            pending.append(child)
    return found


def _kill_orphans(keep: int | None) -> int:
    """SIGKILL every process below this one but `keep` (and what is below `keep`), reap them; how many."""
    orphans = [pid for pid in _children(os.getpid()) if pid != keep]
    doomed = [pid for orphan in orphans for pid in (orphan, *_tree(orphan))]
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in orphans:  # re-parented to this process: reaped here (what is below them comes up next round)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return len(doomed)


@contextlib.contextmanager
def _sweeping_orphans():
    """`start(command, cwd)` runs mutmut and waits; meanwhile orphans are killed every SWEEP_SECONDS;
    on the way out (a SIGTERM or Ctrl-C to this process included) mutmut and everything below it too."""
    if not _become_subreaper():
        yield lambda command, cwd: subprocess.run(command, cwd=cwd, check=False)
        return
    done = threading.Event()
    running: list[subprocess.Popen] = []
    swept = [0]

    def sweep() -> None:
        while not done.wait(SWEEP_SECONDS):
            swept[0] += _kill_orphans(running[0].pid if running else None)

    def start(command: list[str], cwd: Path) -> None:
        running.append(subprocess.Popen(command, cwd=cwd))
        running[0].wait()

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    sweeper = threading.Thread(target=sweep, daemon=True)
    sweeper.start()
    try:
        yield start
    finally:
        done.set()
        sweeper.join()
        if running and running[0].poll() is None:  # stopped: mutmut saves each result as it comes
            running[0].terminate()  # mutmut ignores SIGINT
            try:
                running[0].wait(timeout=10)
            except subprocess.TimeoutExpired:
                running[0].kill()
                running[0].wait()
        while (killed := _kill_orphans(None)) > 0:
            swept[0] += killed
        signal.signal(signal.SIGTERM, previous)
        print(f"(killed {swept[0]} process(es) the tests' workers left behind)", flush=True)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def statuses(module: str) -> dict[str, int | None]:
    meta = folder_of(module) / "mutants" / (module + ".meta")
    if not meta.exists():
        return {}
    return json.loads(meta.read_text())["exit_code_by_key"]


def report(modules: list[str]) -> list[str]:
    """The score table (markdown) and every mutant not killed, by module."""
    lines = [
        "| module | mutants | killed | timeout | survived | no tests | not run | killed % | killed % with a fast test |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    others = []
    for module in modules:
        codes = statuses(module)
        killed = sum(code in KILLED for code in codes.values())
        timeout = sum(code in TIMEOUT for code in codes.values())
        survived = sorted(name for name, code in codes.items() if code == 0)
        untested = sorted(name for name, code in codes.items() if code in (5, 33))
        unrun = sum(code is None for code in codes.values())
        tried = len(codes) - unrun
        score = f"{100 * (killed + timeout) / tried:.1f}" if tried else "-"
        tested = tried - len(untested)  # the mutants some fast test runs the code of
        tested_score = f"{100 * (killed + timeout) / tested:.1f}" if tested else "-"
        lines.append(
            f"| {module} | {len(codes)} | {killed} | {timeout} | {len(survived)} | {len(untested)} | {unrun} | {score} | {tested_score} |"
        )
        others += [f"{name}: survived" for name in survived] + [f"{name}: no tests" for name in untested]
    return [*lines, "", *others]


def main(arguments: list[str]) -> None:
    mutmut, modules = _config()
    retry_timeouts = "--retry-timeouts" in arguments
    arguments = [argument for argument in arguments if argument != "--retry-timeouts"]
    if arguments[:1] != ["--report"]:
        for module in arguments or list(modules):
            run(module, modules[module], mutmut, retry_timeouts)
    print("\n".join(report(list(modules))))


if __name__ == "__main__":
    main(sys.argv[1:])
