"""The dbt-docs service: serves the dbt docs on :8080 and regenerates them after each
successful all-etl run.

Every ELT_DOCS_POLL_SECONDS it asks the Prefect API for the newest Completed `all-etl` run.
When that run is newer than the docs, and no all-etl run is in progress, it runs
`dbt docs generate` on the project the flow builds (same settings, same rendered profile)
and publishes index.html, manifest.json and catalog.json atomically. With DuckDB it reads a
copy of the warehouse file, so it never holds a lock the next run needs.

Files: ELT_DOCS_DIR/site (served), ELT_DOCS_DIR/target (dbt's target path).
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from elt.settings import Settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s dbt-docs %(levelname)s %(message)s")
log = logging.getLogger("dbt-docs")

PLACEHOLDER = """<!doctype html><title>dbt docs</title>
<p>The dbt docs appear here after the first successful <b>all-etl</b> run
(they are regenerated after each one).</p>"""


def prefect() -> httpx.Client:
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    user, _, password = (auth or "").partition(":")
    return httpx.Client(
        base_url=os.environ.get("PREFECT_API_URL", "http://prefect-server:4200/api"),
        auth=(user, password) if auth else None,
        timeout=30,
    )


def all_etl_runs(client: httpx.Client, states: list[str], limit: int = 5) -> list[dict]:
    response = client.post(
        "/flow_runs/filter",
        json={
            "flows": {"name": {"any_": ["all-etl"]}},
            "flow_runs": {"state": {"type": {"any_": states}}},
            "sort": "START_TIME_DESC",
            "limit": limit,
        },
    )
    response.raise_for_status()
    return response.json()


def generate(settings: Settings, run_id: str) -> None:
    from elt import dbt_runner
    from elt.warehouse import warehouse_for

    docs_dir = settings.path(settings.docs_dir)
    site = docs_dir / "site"
    project = dbt_runner.DbtProject.at(dbt_runner.project_folder(settings))
    with tempfile.TemporaryDirectory(prefix="dbt-docs-") as scratch:
        scratch_dir = Path(scratch)
        reading_a_copy = warehouse_for(settings).settings_reading_a_copy(scratch_dir)
        target = docs_dir / "target"
        with dbt_runner.dbt_for(reading_a_copy, project) as dbt:
            completed = dbt.run_captured(
                "docs", "generate", "--target-path", str(target), "--log-path", str(scratch_dir / "logs")
            )
        if completed.returncode != 0:
            tail = "\n".join(completed.stdout.splitlines()[-15:])
            raise RuntimeError(f"dbt docs generate failed (exit {completed.returncode}):\n{tail}")
    staging = Path(tempfile.mkdtemp(prefix=".site-", dir=docs_dir))
    for name in ("index.html", "manifest.json", "catalog.json"):
        shutil.copy2(target / name, staging / name)
    (staging / "generated-for.json").write_text(json.dumps({"flow_run_id": run_id, "at": time.time()}))
    old = docs_dir / ".site-old"
    shutil.rmtree(old, ignore_errors=True)
    if site.exists():
        site.rename(old)
    staging.rename(site)
    shutil.rmtree(old, ignore_errors=True)
    log.info("docs regenerated for all-etl run %s", run_id)


def generated_for(site: Path) -> str | None:
    try:
        return json.loads((site / "generated-for.json").read_text())["flow_run_id"]
    except (OSError, ValueError, KeyError):
        return None


def watch(settings: Settings) -> None:
    site = settings.path(settings.docs_dir) / "site"
    while True:
        try:
            with prefect() as client:
                completed = all_etl_runs(client, ["COMPLETED"], limit=1)
                busy = all_etl_runs(client, ["RUNNING", "PENDING", "CANCELLING"], limit=1)
            if completed and completed[0]["id"] != generated_for(site) and not busy:
                generate(settings, completed[0]["id"])
        except Exception as exc:  # noqa: BLE001 - keep serving the last docs; retry next poll
            log.warning("could not regenerate the docs: %s", exc)
        time.sleep(settings.docs_poll_seconds)


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the site folder by its path, so each request finds the folder swapped in last."""

    def log_message(self, format: str, *args) -> None:
        pass


def main() -> None:
    from elt.settings import load_settings

    settings = load_settings()
    site = settings.path(settings.docs_dir) / "site"
    site.parent.mkdir(parents=True, exist_ok=True)
    if not site.exists():
        site.mkdir()
        (site / "index.html").write_text(PLACEHOLDER)
    threading.Thread(target=watch, args=(settings,), daemon=True).start()
    server = http.server.ThreadingHTTPServer(("0.0.0.0", settings.docs_port), functools.partial(Handler, directory=str(site)))
    log.info("serving %s on :%d", site, settings.docs_port)
    server.serve_forever()


if __name__ == "__main__":
    main()
