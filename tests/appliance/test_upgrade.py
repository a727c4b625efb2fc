"""An upgrade as docs/operations.md ("Updating") tells a user to do it, on a real Docker engine.

A stack of its own (its own compose project, ports and volumes; the shared stack is down by
now) comes up at the previous release, the commit CI last landed before this test existed, and
runs all-etl. A schedule is added to the deployment as the UI would. Then the new release (this
working tree) is pushed to the VM checkout's remote, and the user's two steps run on the VM:
`git pull --ff-only`, then setup.sh. The run history, the schedule, the automations and the
database are kept, and the next run completes on the new code.

Both releases pin the same Prefect (3.8.8), so the server's migrate-on-start has nothing to
apply here: the test checks it started on the kept database at the same Alembic revision. An
upgrade that changes the pin would apply its migrations at that same start.

Needs root and apt, as the other tests of tests/appliance/.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.appliance.stack import BASE_IMAGE, HERE, TERMINAL, Stack, copy_working_tree, git, prepare_checkout, sh
from tests.appliance.test_stack import _psql
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(2400)]

# main as CI landed it before the upgrade test (and the two-lane test run) were added.
PREVIOUS_RELEASE = "582dbb08d9cfad6d2b0b53d877f95bfbb5e76c5b"


def _kept(stack: Stack, deployment_id: str) -> dict:
    """What an upgrade must keep: runs and their states, the deployment's schedules, the automations."""
    with stack.api as api:
        runs = api.post("/flow_runs/filter", json={}).json()
        schedules = api.get(f"/deployments/{deployment_id}/schedules").json()
        automations = api.post("/automations/filter", json={}).json()
    return {
        "runs": sorted((run["id"], run["state"]["type"]) for run in runs),
        "schedules": sorted((schedule["id"], schedule["schedule"].get("interval"), schedule["active"]) for schedule in schedules),
        "automations": sorted((automation["id"], automation["name"]) for automation in automations),
    }


def _previous_release_available() -> None:
    present = sh(["git", "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"], cwd=REPO_ROOT, check=False).returncode == 0
    if not present:  # a shallow clone: fetch just that commit from where this one came from
        sh(["git", "fetch", "-q", "--depth=1", "origin", PREVIOUS_RELEASE], cwd=REPO_ROOT, check=False)
    assert sh(["git", "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"], cwd=REPO_ROOT, check=False).returncode == 0, (
        f"the previous release {PREVIOUS_RELEASE} is not in this clone and could not be fetched: clone with history"
    )


def _push_working_tree(remote: Path, author: Path) -> str:
    """The new release as one commit on the VM's remote: this working tree, files gone included."""
    git("clone", "-q", str(remote), str(author), cwd=author.parent)
    for entry in author.iterdir():
        if entry.name != ".git":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    copy_working_tree(author)
    git("add", "-A", cwd=author)
    git("commit", "-q", "-m", "the new release", cwd=author)
    git("push", "-q", "origin", "HEAD:main", cwd=author)
    return git("rev-parse", "HEAD", cwd=author)


def test_git_pull_then_setup_upgrades_the_previous_release_keeping_history_schedules_and_automations(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("the appliance test needs root and apt-get (it installs and starts a Docker engine)")
    sh(["bash", str(HERE / "install_docker.sh")], timeout=900)
    sh(["bash", str(HERE / "build_base_image.sh"), BASE_IMAGE], timeout=1200)
    _previous_release_available()

    checkout = tmp_path / "vm" / "elt"
    prepare_checkout(checkout, release=PREVIOUS_RELEASE, project=f"elt-upgrade-{os.getpid()}")
    stack = Stack(checkout)
    try:
        t = time.monotonic()
        stack.setup()
        first = stack.start_run()
        assert stack.wait_state(first, TERMINAL, 900)["type"] == "COMPLETED"
        with stack.api as api:
            deployment = api.get("/deployments/name/all-etl/all-etl").json()
            # As the UI's "+ Schedule" saves it; inactive, so it starts no run of its own here.
            created = api.post(
                f"/deployments/{deployment['id']}/schedules", json=[{"schedule": {"interval": 86400}, "active": False}]
            )
            created.raise_for_status()
        before = _kept(stack, deployment["id"])
        assert before["schedules"] and before["automations"] and (first, "COMPLETED") in before["runs"], before
        revision = _psql(stack, "select version_num from alembic_version")
        previous_took = time.monotonic() - t

        # The user's upgrade on the VM: `git pull`, then setup.sh (origin is the container's
        # path /opt/elt/.ci-remote.git; on the host the same remote is the checkout's folder).
        new_release = _push_working_tree(checkout / ".ci-remote.git", tmp_path / "author")
        git("-c", f"url.{checkout / '.ci-remote.git'}.insteadOf=/opt/elt/.ci-remote.git", "pull", "-q", "--ff-only", cwd=checkout)
        assert git("rev-parse", "HEAD", cwd=checkout) == new_release
        upgrade = stack.setup()
        output = upgrade.stdout + upgrade.stderr
        # The automation it had is kept (or updated in place), not made again.
        assert any(f"automation crash-zombie-flow-runs: {how}" in output for how in ("unchanged", "updated")), output

        assert _kept(stack, deployment["id"]) == before
        assert _psql(stack, "select version_num from alembic_version") == revision
        with stack.api as api:
            kept = api.get("/deployments/name/all-etl/all-etl").json()
        assert kept["id"] == deployment["id"]
        assert (REPO_ROOT / "tests" / "appliance" / "test_upgrade.py").read_bytes() == (
            checkout / "tests" / "appliance" / "test_upgrade.py"
        ).read_bytes()  # the VM runs the new release

        after = stack.start_run()
        state = stack.wait_state(after, TERMINAL, 900)
        assert state["type"] == "COMPLETED", state
        assert stack.mart_rows() > 0
        assert git("rev-parse", "HEAD", cwd=checkout) == new_release
        print(
            f"previous release up and one run: {previous_took:.0f} s; upgrade and one run: {time.monotonic() - t - previous_took:.0f} s"
        )
    finally:
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "5", check=False)
