"""Cost per run: Snowflake query-history rows (the documented INFORMATION_SCHEMA.QUERY_HISTORY
columns) are attributed to dbt nodes through dbt-snowflake's query comment and priced by
warehouse size. fakesnow has no query history, so the rows here are written in that shape;
a real account is needed to see Snowflake fill them."""

import pytest

from elt.warehouse_snowflake import cost_line, cost_per_node, query_tag, root_flow_run_id
from prefect import flow, task


def _query(
    node: str | None, elapsed_ms: int, execution_ms: int, scanned: int, size: str = "X-Small", stage: str | None = None
) -> dict:
    comment = (
        f'/* {{"app": "dbt", "dbt_version": "1.11.16", "profile_name": "elt_appliance", "target_name": "snowflake", "node_id": "{node}"}} */\n'
        if node
        else ""
    )
    return {
        "QUERY_ID": "01b2c3d4-0000-0000-0000-000000000001",
        "QUERY_TEXT": comment + "create or replace transient table ANALYTICS.DBT_MARTS.X as (select 1)",
        "QUERY_TAG": query_tag("run-1", stage),
        "WAREHOUSE_SIZE": size,
        "TOTAL_ELAPSED_TIME": elapsed_ms,
        "EXECUTION_TIME": execution_ms,
        "BYTES_SCANNED": scanned,
    }


def test_queries_are_grouped_per_node_and_priced_by_warehouse_size() -> None:
    history = [
        _query("model.shop.daily_revenue", 2_000, 1_800, 1_000_000, "Medium"),
        _query("model.shop.daily_revenue", 1_000, 900, 500_000, "Medium"),
        _query("model.shop.customers", 36_000, 36_000, 9_000_000, "X-Small"),
        _query(None, 100, 50, 0),
    ]
    rows = {row["node"]: row for row in cost_per_node(history)}
    revenue = rows["model.shop.daily_revenue"]
    assert revenue["queries"] == 2 and revenue["elapsed_seconds"] == 3.0 and revenue["bytes_scanned"] == 1_500_000
    assert revenue["estimated_credits"] == round(2_700 / 3_600_000 * 4, 6)
    assert rows["model.shop.customers"]["estimated_credits"] == 0.01
    assert rows["(dbt overhead)"]["queries"] == 1
    total = rows["TOTAL"]
    assert total["queries"] == 4 and total["bytes_scanned"] == 10_500_000
    assert total["estimated_credits"] == round(sum(row["estimated_credits"] for name, row in rows.items() if name != "TOTAL"), 6)


def test_most_expensive_node_comes_first_and_total_last() -> None:
    rows = cost_per_node([_query("model.a", 1, 1_000, 1), _query("model.b", 1, 60_000, 1)])
    assert [row["node"] for row in rows] == ["model.b", "model.a", "TOTAL"]


def test_query_tag_names_the_flow_run() -> None:
    assert query_tag("4b1c") == '{"app":"elt-appliance","flow_run_id":"4b1c"}'


def test_embedded_load_queries_count_as_the_load_and_the_run_has_one_cost_line() -> None:
    rows = cost_per_node([_query(None, 4_000, 3_600, 10, stage="load"), _query("model.a", 1, 3_600, 1)])
    assert {row["node"] for row in rows} == {"(embedded load)", "model.a", "TOTAL"}
    assert cost_line(rows) == "~0.0020 Snowflake credits (estimate: 2 queries, 4.0s; artifact snowflake-cost)"


def test_load_tag_starts_like_the_runs_tag() -> None:
    """run_query_history finds both by the run's tag and that tag followed by a comma."""
    assert query_tag("4b1c", "load") == query_tag("4b1c")[:-1] + ',"stage":"load"}'


@pytest.mark.slow
def test_queries_anywhere_in_the_run_are_tagged_with_the_all_etl_run(prefect_server) -> None:
    """A task inside a child flow (where the embedded load and dbt run) tags with the top run's id."""

    @task
    def tag_in_task() -> str | None:
        return root_flow_run_id()

    @flow
    def child() -> str | None:
        return tag_in_task()

    @flow
    def parent() -> tuple[str, str | None]:
        from prefect.runtime import flow_run

        return str(flow_run.id), child()

    parent_id, tagged = parent()
    assert tagged == parent_id


def test_missing_timings_or_warehouse_cost_nothing_and_sums_are_rounded() -> None:
    """Snowflake leaves WAREHOUSE_SIZE null for a query that ran on no warehouse, and a timing
    null for a query that never ran: they count as a query costing nothing. Seconds add up
    from milliseconds (0.1 + 0.2 is 0.3, not 0.30000000000000004)."""
    history = [
        _query("model.a", 100, 0, 0),
        _query("model.a", 200, 0, 0),
        {**_query(None, 0, 5_000, 0), "WAREHOUSE_SIZE": None, "TOTAL_ELAPSED_TIME": None},
        {**_query("model.b", 0, 0, 0, "6X-Large"), "EXECUTION_TIME": None},
        _query("model.c", 0, 3_600_000_000, 0),  # 1000 hours on an X-Small: 1000 credits
    ]
    rows = {row["node"]: row for row in cost_per_node(history)}
    assert rows["model.a"]["elapsed_seconds"] == 0.3 and rows["TOTAL"]["elapsed_seconds"] == 0.3
    assert rows["(dbt overhead)"] == {
        "node": "(dbt overhead)",
        "queries": 1,
        "elapsed_seconds": 0.0,
        "bytes_scanned": 0,
        "estimated_credits": 0.0,
    }
    assert rows["model.b"]["estimated_credits"] == 0.0
    assert rows["model.c"]["estimated_credits"] == 1000.0
