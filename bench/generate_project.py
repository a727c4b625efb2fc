"""Generate a DuckDB dbt project of N models: staging → intermediate → marts, with tests.

40% staging models (each generates 2,000 rows), 40% intermediate models joining two staging
models, 20% marts aggregating two intermediate models; unique and not_null tests on every
staging and mart key. Usage: python bench/generate_project.py 500 bench/out/p1_500
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def generate(models: int, folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    staging, intermediate = int(models * 0.4), int(models * 0.4)
    marts = models - staging - intermediate
    for layer in ("staging", "intermediate", "marts"):
        (folder / "models" / layer).mkdir(parents=True)
    (folder / "dbt_project.yml").write_text(
        "name: generated\nversion: '1.0'\nconfig-version: 2\nprofile: generated\n"
        "models:\n  generated:\n    staging: {+materialized: view}\n    intermediate: {+materialized: table}\n"
        "    marts: {+materialized: table}\n"
    )
    tests = ["version: 2", "models:"]
    for index in range(staging):
        (folder / "models" / "staging" / f"stg_{index}.sql").write_text(
            f"select i as id, i % 37 as bucket, (i * {index + 7}) % 1000 as amount from range(2000) t(i)\n"
        )
        tests += _key_tests(f"stg_{index}")
    for index in range(intermediate):
        left, right = index % staging, (index * 7 + 3) % staging
        (folder / "models" / "intermediate" / f"int_{index}.sql").write_text(
            f"select a.id, a.bucket, a.amount + b.amount as amount\n"
            f"from {{{{ ref('stg_{left}') }}}} a join {{{{ ref('stg_{right}') }}}} b on a.id = b.id\n"
        )
    for index in range(marts):
        left, right = index % intermediate, (index * 5 + 1) % intermediate
        (folder / "models" / "marts" / f"mart_{index}.sql").write_text(
            f"select bucket as id, sum(amount) as amount from (\n"
            f"  select bucket, amount from {{{{ ref('int_{left}') }}}}\n"
            f"  union all select bucket, amount from {{{{ ref('int_{right}') }}}}\n) group by bucket\n"
        )
        tests += _key_tests(f"mart_{index}")
    (folder / "models" / "schema.yml").write_text("\n".join(tests) + "\n")
    return folder


def _key_tests(model: str) -> list[str]:
    return [f"  - name: {model}", "    columns:", "      - name: id", "        data_tests: [unique, not_null]"]


if __name__ == "__main__":
    generate(int(sys.argv[1]), Path(sys.argv[2]))
