"""P1's PrefectDbtOrchestrator columns: prefect-dbt 0.7.25's orchestrator builds a project inside a flow.

    python bench/p1_orchestrator_flow.py PROJECT_DIR PROFILES_DIR per_wave|per_node

Run by bench/p1_transform_overhead.py with prefect-dbt on PYTHONPATH (it is not in the project's venv).
Prints the count of node results by status as `NODE_STATUSES {...}`.
"""

from __future__ import annotations

import sys
from collections import Counter

from prefect_dbt import PrefectDbtSettings
from prefect_dbt.core._orchestrator import ExecutionMode, PrefectDbtOrchestrator  # 0.7.25 does not export it from prefect_dbt

from prefect import flow


@flow(name="bench-prefect-dbt-orchestrator")
def build(project: str, profiles: str, mode: str) -> None:
    execution_mode = ExecutionMode(mode)
    orchestrator = PrefectDbtOrchestrator(
        settings=PrefectDbtSettings(project_dir=project, profiles_dir=profiles),
        execution_mode=execution_mode,
        # Per node, the default process pool runs several dbt nodes at once, and they collide on
        # DuckDB's single-writer lock: one worker.
        concurrency=1 if execution_mode is ExecutionMode.PER_NODE else None,
    )
    results = orchestrator.run_build()
    print("NODE_STATUSES", dict(Counter(result["status"] for result in results.values())), flush=True)


# The per-node mode's process pool starts its workers by importing this file again.
if __name__ == "__main__":
    build(*sys.argv[1:4])
