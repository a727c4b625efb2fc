"""What an all-etl run shows in Prefect: the summary, the artifacts of each stage, an event per
dbt node that did not simply succeed, and the deployed commit as the deployment's version.

The flows (src/elt/flows.py) call one function per stage; nothing here changes data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.events import emit_event
from prefect.runtime import deployment

from elt import dbt_runner, dbt_state, git_repo
from elt.errors import first_line
from elt.extract.base import ExtractReport
from elt.warehouse import Warehouse
from prefect import get_client, get_run_logger


@dataclass
class EtlSummary:
    extract: ExtractReport | None = None
    deployed: git_repo.Deployed | None = None
    dbt_run: dbt_runner.DbtRun | None = None
    mart_rows: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.stage_seconds[stage] = round(time.monotonic() - started, 2)


# --- extract-load -----------------------------------------------------------------------------
def publish_syncs(report: ExtractReport) -> None:
    create_table_artifact(key="extract-load-results", table=sync_rows(report), description="This run's syncs")


def sync_rows(report: ExtractReport) -> list[dict]:
    rows = []
    for result in report.synced:
        streams = result.rows_per_stream or {"": result.rows}
        rows += [
            {
                "connection": result.connection,
                "stream": stream,
                "status": "succeeded",
                "rows": count,
                "bytes": result.bytes_synced,
                "seconds": round(result.seconds, 1),
                "job": result.job_id,
                "link": result.job_url,
            }
            for stream, count in streams.items()
        ]
    rows += [
        {
            "connection": failure.connection,
            "stream": "",
            "status": "failed",
            "rows": None,
            "bytes": None,
            "seconds": None,
            "job": None,
            "link": failure.error,
        }
        for failure in report.failed
    ]
    return rows


# --- update-code ------------------------------------------------------------------------------
def publish_deployed(deployed: git_repo.Deployed) -> None:
    get_run_logger().info("Deployed %s@%s (%s)", deployed.branch, deployed.sha, "updated" if deployed.changed else "unchanged")
    create_table_artifact(
        key="deployed-commit",
        table=[
            {
                "commit": deployed.sha,
                "branch": deployed.branch,
                "pulled": "updated" if deployed.changed else "unchanged",
                "previous commit": deployed.previous_sha if deployed.changed else "",
                "repo": git_repo.scrub_location(deployed.repo),
            }
        ],
        description="The commit of the dbt project this run built",
    )


def show_deployed_commit_as_version(deployed: git_repo.Deployed) -> None:
    """The deployment's Version in the Prefect UI becomes the commit this run deployed
    (`prefect deploy` records the commit of deploy time, which every `git pull` makes stale).

    Only when it differs: Prefect drops a deployment's future auto-scheduled runs on every
    update (and its scheduler makes them again).
    """
    deployment_id = deployment.id
    if not deployment_id:
        return
    with get_client(sync_client=True) as client:
        if client.read_deployment(deployment_id).version != deployed.sha:
            client.update_deployment(deployment_id, DeploymentUpdate(version=deployed.sha))


# --- transform --------------------------------------------------------------------------------
def publish_dbt_run(run: dbt_runner.DbtRun, warehouse: Warehouse) -> None:
    """An event per node that did not simply succeed, the node results, and what the run cost."""
    for node in run.results:
        _emit_node_event(node)
    for source in run.freshness:
        _emit_freshness_event(source)
    _publish_node_results(run)
    run.cost = _publish_cost(warehouse)


def publish_plan(plan: dbt_state.Plan) -> None:
    """What an --only-changed build runs and skips, one row per node with why, before it starts."""
    counts = plan.counts
    get_run_logger().info("Only changed: %d node(s) to run, %d skipped (%s)", counts["run"], counts["skip"], plan.note)
    create_table_artifact(key="run-plan", table=plan.rows(), description=f"--only-changed: {plan.note}")


_UNEVENTFUL = frozenset({"success", "pass"})


def _emit_node_event(node: dbt_runner.NodeResult) -> None:
    """A Prefect event for each node that did not simply succeed, so automations can react to it.

    Successes are in the dbt-node-results artifact; an event each would cost this process CPU
    per node for nothing an automation needs.
    """
    if node.status in _UNEVENTFUL:
        return
    emit_event(
        event=f"dbt.node.{node.status.replace(' ', '_')}",
        resource={
            "prefect.resource.id": f"dbt.node.{node.unique_id}",
            "prefect.resource.name": node.unique_id.split(".")[-1],
            "dbt.resource_type": node.unique_id.split(".")[0],
        },
        payload={"status": node.status, "seconds": node.seconds, "message": node.short_message},
    )


def _emit_freshness_event(source: dbt_runner.SourceFreshness) -> None:
    """An event for each source whose freshness did not pass, shaped as a node's: a `warn` one is a dbt
    warning to the notify-dbt-warnings automation, its message naming the source and its last load."""
    if source.status == "pass":
        return
    emit_event(
        event=f"dbt.node.{source.status.replace(' ', '_')}",
        resource={
            "prefect.resource.id": f"dbt.node.{source.unique_id}",
            "prefect.resource.name": source.source,
            "dbt.resource_type": "source",
        },
        payload={"status": source.status, "last_loaded": source.max_loaded_at, "message": source.line},
    )


def _publish_cost(warehouse: Warehouse) -> str | None:
    """Cost of this all-etl run (embedded load and dbt), as an artifact and one line; when the
    warehouse can't say, both say why. None where queries cost nothing (DuckDB)."""
    key = f"{warehouse.name.lower()}-cost"
    try:
        cost = warehouse.run_cost()
    except Exception as exc:  # noqa: BLE001 - observability only: the data is built; say why the cost is missing
        reason = first_line(exc)
        get_run_logger().warning("%s cost of this run is unknown: %s", warehouse.name, reason)
        create_markdown_artifact(key=key, markdown=f"Cost unknown: {reason}")
        return f"unknown: {reason}"
    if cost is None:
        return None
    create_table_artifact(key=key, table=cost.rows, description=cost.description)
    return cost.line


def _publish_node_results(run: dbt_runner.DbtRun) -> None:
    if not run.results and not run.freshness:
        return
    freshness = [
        {
            "node": source.unique_id,
            "status": f"freshness {source.status}",
            "seconds": None,
            "rows_affected": None,
            "message": source.line,
        }
        for source in run.freshness
    ]
    create_table_artifact(
        key="dbt-node-results",
        table=freshness
        + [
            {
                "node": node.unique_id,
                "status": node.status,
                "seconds": node.seconds,
                "rows_affected": node.rows_affected,
                "message": node.short_message if node.failed else (node.message or ""),
            }
            for node in run.results
        ],
        description=f"dbt {run.command}: each checked source's freshness, then one row per node",
    )


# --- the whole run ----------------------------------------------------------------------------
def publish_summary(summary: EtlSummary) -> None:
    create_markdown_artifact(key="all-etl-summary", markdown=render_summary(summary), description="What this all-etl run did")


def render_summary(summary: EtlSummary) -> str:
    lines = ["# all-etl run", ""]
    if summary.error:
        lines += [f"**Failed:** {summary.error}", ""]
    lines += ["## Extract-load", ""]
    if summary.extract is None:
        lines += ["Skipped or did not finish.", ""]
    else:
        lines += ["| connection.stream | rows |", "|---|---:|"]
        lines += [f"| {name} | {rows:,} |" for name, rows in summary.extract.rows_per_stream.items()]
        lines += [""]
    lines += ["## Code", ""]
    if summary.deployed is None:
        lines += ["Not pulled in this run.", ""]
    else:
        lines += [f"Commit `{summary.deployed.sha}` on `{summary.deployed.branch}`", ""]
    lines += ["## dbt", ""]
    if summary.dbt_run is None:
        lines += ["Skipped or did not finish.", ""]
    else:
        counts: dict[str, int] = {}
        for node in summary.dbt_run.results:
            counts[node.status] = counts.get(node.status, 0) + 1
        lines += [
            f"`dbt {summary.dbt_run.command}`: " + ", ".join(f"{count} {status}" for status, count in sorted(counts.items())),
            "",
        ]
        if summary.dbt_run.plan:
            counts = summary.dbt_run.plan.counts
            lines += [
                f"`--only-changed`: {counts['run']} node(s) built, {counts['skip']} skipped (the run-plan artifact says why)",
                "",
            ]
        lines += [f"- {source.line}" for source in summary.dbt_run.freshness if source.status != "pass"]
        lines += [""] if any(source.status != "pass" for source in summary.dbt_run.freshness) else []
    if summary.stage_seconds:
        lines += ["## Time", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in summary.stage_seconds.items()]
        lines += [""]
    if summary.mart_rows:
        lines += ["## Marts", "", "| table | rows |", "|---|---:|"]
        lines += [f"| {table} | {rows:,} |" for table, rows in summary.mart_rows.items()]
    return "\n".join(lines) + "\n"
