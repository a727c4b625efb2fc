"""The appliance stack, built and brought up once per test session and shared by every test
under tests/appliance/ (the API tests in test_stack.py and the browser tests in
test_browser.py): bringing it up costs minutes on a small CI machine.

Needs root and apt (tests/appliance/install_docker.sh installs docker.io, docker-compose and
debootstrap); skipped otherwise.

The stack goes down right after the last test that uses it (not at the session's end): the
tests after it then have the machine's two cores to themselves.

While working on these tests: ELT_APPLIANCE_CHECKOUT=<checkout of a stack already up> runs
them against that stack (no setup.sh, no teardown).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.alert_receivers import start_receivers, stop_receivers
from tests.appliance.stack import (
    BASE_IMAGE,
    HERE,
    Stack,
    alert_settings,
    docker_bridge_gateway,
    prepare_checkout,
    sh,
    slack_redirect_override,
)

# The example of docs/operations.md ("Local changes to the stack"), written as a user would:
# an environment variable for one service, in the git-ignored override file.
OVERRIDE_EXAMPLE = """\
version: "2.4"
services:
  prefect-worker:
    environment:
      TZ: Europe/Berlin
"""


def pytest_configure(config):
    config.addinivalue_line("markers", "docker: brings up the appliance on a real Docker engine (needs root and apt)")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("the appliance test needs root and apt-get (it installs and starts a Docker engine)")
    if os.environ.get("ELT_APPLIANCE_CHECKOUT"):
        existing = Stack(Path(os.environ["ELT_APPLIANCE_CHECKOUT"]))
        existing.first_output, existing.timings = "", {}
        yield existing
        return
    timings: dict[str, float] = {}
    started = time.monotonic()
    sh(["bash", str(HERE / "install_docker.sh")], timeout=900)
    sh(["bash", str(HERE / "build_base_image.sh"), BASE_IMAGE], timeout=1200)
    timings["engine+base image"] = time.monotonic() - started

    # Every alert channel set, delivered to receivers on the host's Docker bridge address.
    receivers = start_receivers(docker_bridge_gateway(), seen_as="host.docker.internal")
    checkout = tmp_path_factory.mktemp("vm") / "elt"
    prepare_checkout(checkout, alert_settings(receivers))
    (checkout / "docker" / "docker-compose.override.yml").write_text(
        OVERRIDE_EXAMPLE + slack_redirect_override(receivers, tmp_path_factory.mktemp("slack-redirect"))
    )
    stack = Stack(checkout, receivers)
    _running.append((stack, tmp_path_factory.getbasetemp()))
    try:
        t = time.monotonic()
        first = stack.setup()
        timings["setup.sh (first)"] = time.monotonic() - t
        stack.first_output = first.stdout + first.stderr
        stack.timings = timings
        yield stack
    finally:
        _stop_stack()
        print("appliance timings:", json.dumps({k: round(v) for k, v in timings.items()}))


_running: list[tuple[Stack, Path]] = []


def _stop_stack() -> None:
    if not _running:
        return
    stack, basetemp = _running.pop()
    logs = stack.compose("logs", "--no-color", "--tail", "200", check=False).stdout
    (basetemp / "stack.log").write_text(logs)
    stack.compose("down", "-v", "--remove-orphans", "--timeout", "5", check=False)
    if stack.receivers:
        stop_receivers(stack.receivers)
    # The image elt-appliance:ci stays: its layers are the build cache of the next run.


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if not _running:
        return
    items = item.session.items
    later = items[items.index(item) + 1 :]
    if not any("stack" in getattr(other, "fixturenames", ()) for other in later):
        _stop_stack()
