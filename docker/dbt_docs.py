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

import httpx

logging.basicConfig(level=logging.INFO, format="%(asctime)s dbt-docs %(levelname)s %(message)s")
log = logging.getLogger("dbt-docs")

DOCS_DIR = Path(os.environ.get("ELT_DOCS_DIR", "/var/lib/elt/dbt-docs"))
SITE = DOCS_DIR / "site"
POLL_SECONDS = float(os.environ.get("ELT_DOCS_POLL_SECONDS", "30"))
PORT = int(os.environ.get("ELT_DOCS_PORT", "8080"))
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


def generate(run_id: str) -> None:
    from elt import dbt_runner
    from elt.settings import load_settings
    from elt.warehouse import warehouse_for

    settings = load_settings()
    project = dbt_runner.DbtProject.at(dbt_runner.project_folder(settings))
    with tempfile.TemporaryDirectory(prefix="dbt-docs-") as scratch:
        scratch_dir = Path(scratch)
        settings = warehouse_for(settings).settings_reading_a_copy(scratch_dir)
        target = DOCS_DIR / "target"
        with dbt_runner.dbt_for(settings, project) as dbt:
            completed = dbt.run_captured(
                "docs", "generate", "--target-path", str(target), "--log-path", str(scratch_dir / "logs")
            )
        if completed.returncode != 0:
            tail = "\n".join(completed.stdout.splitlines()[-15:])
            raise RuntimeError(f"dbt docs generate failed (exit {completed.returncode}):\n{tail}")
    staging = Path(tempfile.mkdtemp(prefix=".site-", dir=DOCS_DIR))
    for name in ("index.html", "manifest.json", "catalog.json"):
        shutil.copy2(target / name, staging / name)
    (staging / "generated-for.json").write_text(json.dumps({"flow_run_id": run_id, "at": time.time()}))
    old = DOCS_DIR / ".site-old"
    shutil.rmtree(old, ignore_errors=True)
    if SITE.exists():
        SITE.rename(old)
    staging.rename(SITE)
    shutil.rmtree(old, ignore_errors=True)
    log.info("docs regenerated for all-etl run %s", run_id)


def generated_for() -> str | None:
    try:
        return json.loads((SITE / "generated-for.json").read_text())["flow_run_id"]
    except (OSError, ValueError, KeyError):
        return None


def watch() -> None:
    while True:
        try:
            with prefect() as client:
                completed = all_etl_runs(client, ["COMPLETED"], limit=1)
                busy = all_etl_runs(client, ["RUNNING", "PENDING", "CANCELLING"], limit=1)
            if completed and completed[0]["id"] != generated_for() and not busy:
                generate(completed[0]["id"])
        except Exception as exc:  # noqa: BLE001 - keep serving the last docs; retry next poll
            log.warning("could not regenerate the docs: %s", exc)
        time.sleep(POLL_SECONDS)


class Handler(http.server.SimpleHTTPRequestHandler):
    def translate_path(self, path: str) -> str:  # re-resolve SITE: it is swapped atomically
        self.directory = str(SITE)
        return super().translate_path(path)

    def log_message(self, format: str, *args) -> None:
        pass


def main() -> None:
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    if not SITE.exists():
        SITE.mkdir()
        (SITE / "index.html").write_text(PLACEHOLDER)
    threading.Thread(target=watch, daemon=True).start()
    server = http.server.ThreadingHTTPServer(("0.0.0.0", PORT), functools.partial(Handler, directory=str(SITE)))
    log.info("serving %s on :%d", SITE, PORT)
    server.serve_forever()


if __name__ == "__main__":
    main()
