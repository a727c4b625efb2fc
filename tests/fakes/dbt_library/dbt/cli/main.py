"""The stand-in's dbtRunner and `dbt` command: see dbt/__init__.py here."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dbt.cli.exceptions import DbtUsageException
from dbt.contracts.graph.manifest import Manifest

WAIT_SECONDS = 30.0


@dataclass
class dbtRunnerResult:
    success: bool
    exception: BaseException | None = None
    result: object = None


class dbtRunner:
    def __init__(self, manifest: Manifest | None = None, callbacks: list | None = None) -> None:
        self.manifest = manifest

    def invoke(self, args: list[str], **kwargs: object) -> dbtRunnerResult:
        outcome = _run(list(args), via="runner", manifest=self.manifest is not None)
        if outcome == "success":
            return dbtRunnerResult(True, result=Manifest() if args[:1] == ["parse"] else None)
        if outcome == "failed":
            return dbtRunnerResult(False)
        if outcome == "usage":
            return dbtRunnerResult(False, exception=DbtUsageException(f"No such command '{args[0]}'."))
        return dbtRunnerResult(False, exception=RuntimeError("dbt could not run"))


def cli() -> None:
    outcome = _run(sys.argv[1:], via="cli", manifest=False)
    if outcome == "usage":
        print(f"Error: No such command '{sys.argv[1]}'.")
    sys.stdout.flush()
    sys.exit({"success": 0, "failed": 1}.get(outcome, 2))


def _run(args: list[str], *, via: str, manifest: bool) -> str:
    entry = _script().get(args[0] if args else "", {})
    log = os.environ.get("FAKE_DBT_LOG")
    if log:
        record = {"pid": os.getpid(), "executable": sys.executable, "via": via, "arguments": args, "cwd": os.getcwd()}
        record["manifest"] = manifest
        with open(log, "a") as file:
            file.write(json.dumps({**record, "env": dict(os.environ)}) + "\n")
    for line in entry.get("print", []):
        print(line)  # not flushed: a line reaches the reader as the process's stdout is buffered
    for line in entry.get("stderr", []):
        print(line, file=sys.stderr)
    time.sleep(entry.get("seconds", 0))
    if "wait_for" in entry:
        deadline = time.monotonic() + entry.get("wait_seconds", WAIT_SECONDS)
        while not Path(entry["wait_for"]).exists():
            if time.monotonic() > deadline:
                print(f"gave up waiting for {entry['wait_for']}")
                return "error"
            time.sleep(0.01)
        for line in entry.get("print_after", []):
            print(line)
    if "signal" in entry:
        sys.stdout.flush()
        os.kill(os.getpid(), entry["signal"])
    if "exit" in entry:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(entry["exit"])
    if "--no-write-json" not in args:
        target = Path(_option(args, "--project-dir") or os.getcwd()) / "target"
        for name, document in entry.get("files", {}).items():
            target.mkdir(exist_ok=True)
            (target / name).write_text(json.dumps(document))
    return entry.get("outcome", "success")


def _script() -> dict:
    path = os.environ.get("FAKE_DBT_SCRIPT")
    return json.loads(Path(path).read_text()) if path else {}


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args[:-1] else None
