"""P2: the extract-load stage against the fake Airbyte server (tests/fakes, contract-checked).

N connections whose syncs take a fixed time each; the stage's wall time against the ideal
(one sync's time, when all run at once), and API requests per sync. Target with 20 syncs of
10 s: the stage ends within 10 s + one poll interval + 2 s.

    .venv/bin/python bench/p2_extract_concurrency.py [--sizes 5 20 100] [--sync-seconds 10] [--poll 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _harness import OUT, REPO_ROOT, machine, prefect_server, table

sys.path.insert(0, str(REPO_ROOT))
from tests.fakes.airbyte_server import FakeAirbyte


def run_stage(count: int, sync_seconds: float, poll: float, concurrency: int) -> tuple[float, float]:
    from prefect.task_runners import ThreadPoolTaskRunner

    from elt.flows import extract_load

    with FakeAirbyte() as fake:
        for index in range(count):
            fake.add_connection(f"conn-{index:03d}", sync_seconds=sync_seconds)
        os.environ.update(
            {
                "ELT_AIRBYTE_BACKEND": "server",
                "ELT_AIRBYTE_URL": fake.ui_url,
                "ELT_AIRBYTE_CLIENT_ID": "fake-client-id",
                "ELT_AIRBYTE_CLIENT_SECRET": "fake-client-secret",
                "ELT_AIRBYTE_POLL_SECONDS": str(poll),
                "ELT_EXTRACT_CONCURRENCY": str(concurrency),
            }
        )
        started = time.monotonic()
        report = extract_load.with_options(task_runner=ThreadPoolTaskRunner(max_workers=concurrency))()
        seconds = time.monotonic() - started
        fake.assert_no_violations()
        assert len(report.synced) == count
        return seconds, fake.count() / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 20, 100])
    parser.add_argument("--sync-seconds", type=float, default=10)
    parser.add_argument("--poll", type=float, default=1)
    options = parser.parse_args()
    rows = []
    with prefect_server() as api_url:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            for count in options.sizes:
                for concurrency, label in ((count, "all at once"), (10, "default (10)")):
                    if concurrency == 10 and count <= 10:
                        continue
                    seconds, requests = run_stage(count, options.sync_seconds, options.poll, concurrency)
                    waves = -(-count // concurrency)
                    ideal = waves * options.sync_seconds
                    target = ideal + options.poll + 2
                    rows.append(
                        [
                            count,
                            label,
                            f"{seconds:.1f} s",
                            f"{ideal:.0f} s",
                            f"{seconds / ideal:.2f}×",
                            f"≤ {target:.0f} s: {'met' if seconds <= target else 'MISSED'}",
                            f"{requests:.1f}",
                        ]
                    )
                    print(rows[-1], flush=True)
    report = (
        f"P2 extract concurrency ({options.sync_seconds:g} s syncs, polled every {options.poll:g} s) — {machine()}\n\n"
        + table(["connections", "concurrency", "stage", "ideal", "ratio", "target", "API requests per sync"], rows)
        + "\n"
    )
    (OUT / "p2.md").write_text(report)
    print("\n" + report)


if __name__ == "__main__":
    main()
