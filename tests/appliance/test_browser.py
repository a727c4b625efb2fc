"""The appliance as its user touches it: the Prefect UI and the dbt docs in a real browser.

A real headless Chromium (Debian's `chromium`, driven by Playwright's Python package through
`executable_path`: Playwright's own browser download needs a CDN CI cannot reach) opens the
UI on the published 127.0.0.1 port, as the SSH tunnel would, on the shared compose stack of
tests/appliance/conftest.py. It follows the user path of docs/operations.md: log in with the
auth string from `.env`, find all-etl under Deployments, add an interval schedule by clicking
and watch a scheduled run complete, start a Quick run and open it (child flows, the four
artifacts as tables, the Deployment Version), then find the model added by the last
`git pull` in the dbt docs.

Every step saves a screenshot in tests/appliance/screenshots/ (git-ignored; CI keeps it as
an artifact), so a person can look at what the user sees.
"""

from __future__ import annotations

import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.appliance.stack import TERMINAL, Stack, git

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(2400)]

SCREENSHOTS = Path(__file__).parent / "screenshots"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ("all-etl-summary", "extract-load-results", "dbt-node-results", "deployed-commit")
CHILD_FLOWS = ("extract-load", "update-code", "transform")
NEW_MODEL = "pulled_by_the_browser_test"
SECONDS = 1000  # Playwright timeouts are in milliseconds


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class User:
    """One browser tab of a user who reached the appliance through the tunnel."""

    def __init__(self, page, stack: Stack) -> None:
        self.page = page
        self.stack = stack
        self.base = f"http://127.0.0.1:{stack.env['PREFECT_PORT']}"
        page.set_default_timeout(90 * SECONDS)  # a wait, not a limit: the other test lane shares the CPU

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    def open_deployment(self) -> None:
        self.page.goto(self.base + "/")
        self.page.get_by_role("link", name="Deployments", exact=True).click()
        self.page.get_by_role("link", name="all-etl").first.click()
        self.page.get_by_text("Deployment Version").wait_for()

    def child_runs(self) -> dict[str, str]:
        """{child flow: its run's name} from the Subflow Runs tab (each card links the flow, then the run)."""
        from playwright.sync_api import expect

        panel = self.page.get_by_role("tabpanel", name="Subflow Runs")
        for child in CHILD_FLOWS:
            panel.get_by_role("link", name=child, exact=True).wait_for()
        links = panel.locator("a")
        expect(links).to_have_count(2 * len(CHILD_FLOWS))
        texts = [links.nth(index).inner_text().strip() for index in range(links.count())]
        return {texts[index]: texts[index + 1] for index in range(0, len(texts) - 1, 2)}

    def open_artifact(self, run_page: str, child_run: str | None, key: str) -> None:
        """Run page (or one of its child runs) > Artifacts > the key > this run's entry; waits for its table."""
        self.page.goto(run_page)
        if child_run:
            self.page.get_by_role("tab", name="Subflow Runs").click()
            self.page.get_by_role("link", name=child_run, exact=True).click()
            self.page.get_by_role("tab", name="Artifacts").wait_for()
        name = child_run or self.run_name
        self.page.get_by_role("tab", name="Artifacts").click()
        self.page.get_by_text(key, exact=True).first.click()
        self.page.wait_for_url(re.compile(r"/artifacts/key/"))
        entry = (
            self.page.locator("div")
            .filter(has=self.page.get_by_role("link", name=name, exact=True))
            .filter(has=self.page.locator("a[href*='/artifacts/artifact/']"))
            .last
        )
        entry.locator("a[href*='/artifacts/artifact/']").first.click()
        self.page.wait_for_url(re.compile(r"/artifacts/artifact/"))
        # A header and at least one row. Waited for, not counted at once: the markdown renders the
        # <table> before its rows (CI once counted 0 rows in a table that then filled).
        self.page.locator("table tr").nth(1).wait_for()


def login(page, base: str, auth_string: str) -> None:
    page.goto(base + "/")
    field = page.get_by_placeholder("admin:pass")
    field.fill(auth_string)
    page.get_by_role("button", name="Login").click()


@pytest.fixture(scope="module")
def user(browser, stack: Stack) -> User:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    user = User(page, stack)
    login(page, user.base, stack.env["PREFECT_SERVER_API_AUTH_STRING"])
    page.wait_for_url(re.compile(r"/v2/dashboard"))
    yield user
    context.close()


def wait_for(description: str, check, timeout: float, interval: float = 3):
    """Polls `check` until it returns something truthy; fails naming `description` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{description}: not after {timeout} s")
        time.sleep(interval)


def deployment_runs(stack: Stack, **flow_run_filter) -> list[dict]:
    with stack.api as api:
        deployment = api.get("/deployments/name/all-etl/all-etl").json()
        response = api.post(
            "/flow_runs/filter",
            json={
                "deployments": {"id": {"any_": [deployment["id"]]}},
                "flow_runs": flow_run_filter,
                "sort": "START_TIME_DESC",
                "limit": 50,
            },
        )
        response.raise_for_status()
        return response.json()


def test_the_ui_is_served_and_asks_for_the_auth_string(browser, stack: Stack) -> None:
    base = f"http://127.0.0.1:{stack.env['PREFECT_PORT']}"
    assert httpx.get(base + "/", follow_redirects=True, timeout=30).status_code == 200
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    try:
        login(page, base, "admin:not-the-password")
        page.get_by_text("Invalid credentials").wait_for()
        page.screenshot(path=str(SCREENSHOTS / "01-login-wrong-password.png"))

        field = page.get_by_placeholder("admin:pass")
        assert field.get_attribute("type") == "password"  # the screenshot shows dots, not the secret
        login(page, base, stack.env["PREFECT_SERVER_API_AUTH_STRING"])
        page.wait_for_url(re.compile(r"/v2/dashboard"))
        page.get_by_role("link", name="Deployments", exact=True).wait_for()
        page.screenshot(path=str(SCREENSHOTS / "02-logged-in-dashboard.png"))
    finally:
        context.close()


def test_all_etl_is_under_deployments(user: User) -> None:
    user.page.goto(user.base + "/")
    user.page.get_by_role("link", name="Deployments", exact=True).click()
    row = user.page.get_by_role("row").filter(has_text="all-etl")
    row.first.wait_for()
    assert "Ready" in row.first.inner_text()
    user.shot("03-deployments")


def test_an_interval_schedule_added_in_the_ui_runs_all_etl(user: User) -> None:
    page, stack = user.page, user.stack
    user.open_deployment()
    page.get_by_role("button", name="Schedule", exact=True).click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("tab", name="Interval").click()
    dialog.get_by_label("Value").fill("1")
    user.shot("04-add-schedule")
    saved_at = datetime.now(UTC)
    dialog.get_by_role("button", name="Save").click()
    page.get_by_text("Every 1 minute").wait_for()
    user.shot("05-deployment-with-schedule")

    def made_by_the_schedule(*types: str) -> list[dict]:
        runs = deployment_runs(stack, state={"type": {"any_": list(types)}})
        return [run for run in runs if run["auto_scheduled"] and datetime.fromisoformat(run["created"]) >= saved_at]

    try:
        started = wait_for(
            "a run made by the schedule started",
            lambda: made_by_the_schedule("RUNNING", "COMPLETED", "FAILED", "CRASHED"),
            timeout=600,
            interval=5,
        )[0]
    finally:
        # The schedule would keep making runs for the tests after this one: remove it and its
        # queued runs once its first run has started.
        with stack.api as api:
            deployment = api.get("/deployments/name/all-etl/all-etl").json()
            for schedule in api.get(f"/deployments/{deployment['id']}/schedules").json():
                api.delete(f"/deployments/{deployment['id']}/schedules/{schedule['id']}").raise_for_status()
        for run in deployment_runs(stack, state={"type": {"any_": ["SCHEDULED"]}}):
            with stack.api as api:
                api.delete(f"/flow_runs/{run['id']}")
    state = stack.wait_state(started["id"], TERMINAL, 900)
    assert state["type"] == "COMPLETED", state
    page.goto(f"{user.base}/v2/runs/flow-run/{started['id']}")
    page.get_by_text("auto-scheduled").first.wait_for()
    page.get_by_text("Completed", exact=True).first.wait_for()
    page.get_by_role("tab", name="Subflow Runs").click()
    assert sorted(user.child_runs()) == sorted(CHILD_FLOWS)
    user.shot("06-scheduled-run-completed")
    assert not deployment_runs(stack, state={"type": {"any_": ["PENDING", "RUNNING", "SCHEDULED"]}})


def test_a_quick_run_shows_its_child_flows_artifacts_and_the_deployed_commit(user: User, tmp_path: Path) -> None:
    page, stack = user.page, user.stack
    # The user's colleague pushes a new dbt model; the run's update-code stage pulls it.
    author = tmp_path / "author"
    git("clone", "-q", str(stack.checkout / ".ci-remote.git"), str(author), cwd=tmp_path)
    (author / "dbt" / "models" / "marts" / f"{NEW_MODEL}.sql").write_text(
        "-- Added by tests/appliance/test_browser.py: the dbt docs must show it after the next run.\n"
        "select count(*) as customers from {{ ref('customer_lifetime_value') }}\n"
    )
    git("add", "-A", cwd=author)
    git("commit", "-q", "--allow-empty", "-m", "a new model", cwd=author)
    git("push", "-q", "origin", "HEAD:main", cwd=author)
    pushed = git("rev-parse", "HEAD", cwd=author)

    user.open_deployment()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Quick run").click()
    page.get_by_role("button", name="View run").click()
    page.wait_for_url(re.compile(r"/runs/flow-run/"))
    run_id = page.url.rstrip("/").split("/")[-1].split("?")[0]
    with stack.api as api:
        user.run_name = api.get(f"/flow_runs/{run_id}").json()["name"]
    page.get_by_text(user.run_name).first.wait_for()
    user.shot("07-quick-run-started")

    state = stack.wait_state(run_id, TERMINAL, 900)
    assert state["type"] == "COMPLETED", state
    stack.browser_run = run_id
    page.reload()
    page.get_by_text("Completed").first.wait_for()
    user.shot("08-quick-run-completed")

    page.get_by_role("tab", name="Subflow Runs").click()
    child_runs = user.child_runs()
    assert sorted(child_runs) == sorted(CHILD_FLOWS), child_runs
    for child in CHILD_FLOWS:
        page.get_by_role("link", name=child_runs[child], exact=True).wait_for()
    assert page.get_by_role("tabpanel", name="Subflow Runs").get_by_text("Completed", exact=True).count() == len(CHILD_FLOWS)
    user.shot("09-child-flows")

    run_page = page.url
    user.open_artifact(run_page, None, "all-etl-summary")
    # Waited for, not counted: the artifact page re-renders its markdown once it settles on ?tab=Artifact.
    for header in ("connection.stream", "stage", "table"):
        page.get_by_role("columnheader", name=header, exact=True).first.wait_for()
    user.shot("10-artifact-all-etl-summary")
    user.open_artifact(run_page, child_runs["extract-load"], "extract-load-results")
    page.get_by_role("cell", name="faker", exact=True).first.wait_for()
    user.shot("11-artifact-extract-load-results")
    user.open_artifact(run_page, child_runs["update-code"], "deployed-commit")
    page.get_by_role("cell", name=pushed, exact=True).wait_for()
    user.shot("12-artifact-deployed-commit")
    user.open_artifact(run_page, child_runs["transform"], "dbt-node-results")
    page.get_by_role("cell", name="success", exact=True).first.wait_for()
    user.shot("13-artifact-dbt-node-results")

    user.open_deployment()
    version = page.get_by_text("Deployment Version").locator("xpath=following-sibling::*[1]")
    assert version.inner_text().strip() == pushed
    user.shot("14-deployment-version-is-the-deployed-commit")


def test_the_dbt_docs_show_the_model_the_last_pull_added(user: User) -> None:
    stack, page = user.stack, user.page
    run_id = getattr(stack, "browser_run", None)
    assert run_id, "needs the Quick run of the test before"
    docs = f"http://127.0.0.1:{stack.env['DBT_DOCS_PORT']}"

    def regenerated() -> bool:
        response = httpx.get(f"{docs}/generated-for.json", timeout=10)
        return response.status_code == 200 and response.json()["flow_run_id"] == run_id

    wait_for(f"the dbt docs regenerated for run {run_id}", regenerated, timeout=600)
    page.goto(docs + "/")
    page.get_by_placeholder(re.compile("Search for models", re.I)).fill(NEW_MODEL)
    page.get_by_text(NEW_MODEL).first.wait_for()
    user.shot("15-dbt-docs-search")
    page.locator("h4", has_text=NEW_MODEL).first.click()
    page.get_by_role("heading", name=f"{NEW_MODEL} table").wait_for()
    assert page.url.endswith(f"#!/model/model.elt_appliance.{NEW_MODEL}"), page.url
    page.get_by_text(f"main_marts.{NEW_MODEL}").first.wait_for()  # the relation it was built into
    user.shot("16-dbt-docs-new-model")
