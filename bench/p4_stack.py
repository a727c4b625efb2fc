"""P4: the appliance stack: `docker compose up` with images built, to every service healthy,
and the idle memory of the Prefect server, the worker and PostgreSQL together.

Needs root and apt (it installs a Docker engine like the appliance test). Targets: ≤ 60 s to
healthy, ≤ 1 GB idle.

    .venv/bin/python bench/p4_stack.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import OUT, REPO_ROOT, machine, table

sys.path.insert(0, str(REPO_ROOT))
from tests.appliance.test_stack import BASE_IMAGE, HERE, Stack, prepare_checkout, sh

SERVICES = ("postgres", "prefect-server", "prefect-worker", "dbt-docs")
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def healthy(stack: Stack) -> bool:
    for container in stack.container_ids().values():
        if not container:
            return False
        status = sh(["docker", "inspect", "-f", "{{.State.Health.Status}}", container], check=False).stdout.strip()
        if status != "healthy":
            return False
    return True


def memory_mb(container: str) -> float:
    usage = sh(["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", container]).stdout.split("/")[0].strip()
    number, unit = re.match(r"([0-9.]+)\s*([A-Za-z]+)", usage).groups()
    return float(number) * UNITS[unit] / 2**20


def main() -> None:
    sh(["bash", str(HERE / "install_docker.sh")], timeout=900)
    sh(["bash", str(HERE / "build_base_image.sh"), BASE_IMAGE], timeout=1200)
    workdir = Path(tempfile.mkdtemp(prefix="elt-p4-"))
    stack = Stack(workdir / "elt")
    prepare_checkout(stack.checkout)
    try:
        stack.setup()  # builds the image and brings the stack up once
        stack.compose("down", "--timeout", "10")
        started = time.monotonic()
        stack.compose("up", "-d")
        while not healthy(stack):
            if time.monotonic() - started > 600:
                raise SystemExit("the stack did not become healthy in 600 s")
            time.sleep(0.5)
        up_seconds = time.monotonic() - started
        time.sleep(30)  # idle
        ids = stack.container_ids()
        memory = {service: memory_mb(ids[service]) for service in ("prefect-server", "prefect-worker", "postgres")}
        memory["dbt-docs (not in the target)"] = memory_mb(ids["dbt-docs"])
    finally:
        stack.compose("down", "-v", "--timeout", "5", check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    idle = sum(value for name, value in memory.items() if "not in" not in name)
    rows = [
        ["up to healthy", f"{up_seconds:.1f} s", "≤ 60 s", "met" if up_seconds <= 60 else "MISSED"],
        ["idle memory: server + worker + PostgreSQL", f"{idle:.0f} MB", "≤ 1024 MB", "met" if idle <= 1024 else "MISSED"],
    ]
    detail = ", ".join(f"{name} {value:.0f} MB" for name, value in memory.items())
    report = f"P4 the stack — {machine()}\n\n{table(['measure', 'value', 'target', ''], rows)}\n\nPer container: {detail}.\n"
    (OUT / "p4.md").write_text(report)
    print("\n" + report)


if __name__ == "__main__":
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        raise SystemExit("P4 needs root: it installs and starts a Docker engine")
    main()
