"""Generate a DuckDB dbt project of N models: staging → intermediate → marts, with tests.

40% staging models (each generates 2,000 rows), 40% intermediate models joining two staging
models, 20% marts aggregating two intermediate models; unique and not_null tests on every
staging and mart key. Usage: python bench/generate_project.py 500 bench/out/p1_500

With `sources=S` (P5) the staging models read S raw tables instead of generating rows, as an
Airbyte-fed project does: source `raw` (schema `raw`, tables `table_0` … `table_<S-1>`, each
with `_airbyte_extracted_at` as its loaded_at_field and a freshness block). The project is then
S domains, one per raw table: model i of each layer belongs to domain i % S, and joins and
aggregates only models of its own domain, so each raw table feeds exactly its domain's models.
`load_raw_tables` creates the tables in the DuckDB file.
"""

from __future__ import annotations

import shutil
import sys
from datetime import datetime
from pathlib import Path

RAW_ROWS = 2000


def generate(models: int, folder: Path, sources: int = 0) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    staging, intermediate = int(models * 0.4), int(models * 0.4)
    marts = models - staging - intermediate
    if sources and min(staging, intermediate) < sources:
        raise ValueError(f"{models} models are too few for {sources} source domains")
    for layer in ("staging", "intermediate", "marts"):
        (folder / "models" / layer).mkdir(parents=True)
    (folder / "dbt_project.yml").write_text(
        "name: generated\nversion: '1.0'\nconfig-version: 2\nprofile: generated\n"
        "models:\n  generated:\n    staging: {+materialized: view}\n    intermediate: {+materialized: table}\n"
        "    marts: {+materialized: table}\n"
    )
    tests = ["version: 2", "models:"]
    for index in range(staging):
        if sources:
            body = f"select id, id % 37 as bucket, (id * {index + 7}) % 1000 as amount from {{{{ source('raw', 'table_{index % sources}') }}}}\n"
        else:
            body = f"select i as id, i % 37 as bucket, (i * {index + 7}) % 1000 as amount from range(2000) t(i)\n"
        (folder / "models" / "staging" / f"stg_{index}.sql").write_text(body)
        tests += _key_tests(f"stg_{index}")
    for index in range(intermediate):
        if sources:
            left, right = _in_domain(index, staging, sources, 7, 3)
        else:
            left, right = index % staging, (index * 7 + 3) % staging
        (folder / "models" / "intermediate" / f"int_{index}.sql").write_text(
            f"select a.id, a.bucket, a.amount + b.amount as amount\n"
            f"from {{{{ ref('stg_{left}') }}}} a join {{{{ ref('stg_{right}') }}}} b on a.id = b.id\n"
        )
    for index in range(marts):
        if sources:
            left, right = _in_domain(index, intermediate, sources, 5, 1)
        else:
            left, right = index % intermediate, (index * 5 + 1) % intermediate
        (folder / "models" / "marts" / f"mart_{index}.sql").write_text(
            f"select bucket as id, sum(amount) as amount from (\n"
            f"  select bucket, amount from {{{{ ref('int_{left}') }}}}\n"
            f"  union all select bucket, amount from {{{{ ref('int_{right}') }}}}\n) group by bucket\n"
        )
        tests += _key_tests(f"mart_{index}")
    (folder / "models" / "schema.yml").write_text("\n".join(tests) + "\n")
    if sources:
        (folder / "models" / "sources.yml").write_text(
            "version: 2\nsources:\n  - name: raw\n    schema: raw\n    config:\n"
            "      loaded_at_field: _airbyte_extracted_at\n"
            "      freshness:\n        warn_after: {count: 24, period: hour}\n        error_after: {count: 48, period: hour}\n"
            "    tables:\n" + "".join(f"      - name: table_{table}\n" for table in range(sources))
        )
    return folder


def _in_domain(index: int, upstream: int, sources: int, step: int, offset: int) -> tuple[int, int]:
    """Two upstream models of model `index`'s domain (index % sources), picked as P1 picks them."""
    domain, position = index % sources, index // sources
    per_domain = len(range(domain, upstream, sources))
    return domain + sources * (position % per_domain), domain + sources * ((position * step + offset) % per_domain)


def domain_models(models: int, sources: int, domain: int) -> set[str]:
    """The names of the models a raw table feeds (all of its domain)."""
    staging, intermediate = int(models * 0.4), int(models * 0.4)
    layers = {"stg": staging, "int": intermediate, "mart": models - staging - intermediate}
    return {f"{prefix}_{index}" for prefix, count in layers.items() for index in range(domain, count, sources)}


def load_raw_tables(database: Path, sources: int, loaded_at: datetime) -> None:
    """The raw tables of a `sources=S` project, as Airbyte lands them: RAW_ROWS rows each, all loaded at `loaded_at`."""
    import duckdb

    with duckdb.connect(str(database)) as connection:
        connection.execute("create schema if not exists raw")
        for table in range(sources):
            connection.execute(
                f"create or replace table raw.table_{table} as"
                f" select range as id, ?::timestamptz as _airbyte_extracted_at from range({RAW_ROWS})",
                [loaded_at],
            )


def _key_tests(model: str) -> list[str]:
    return [f"  - name: {model}", "    columns:", "      - name: id", "        data_tests: [unique, not_null]"]


if __name__ == "__main__":
    generate(int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
