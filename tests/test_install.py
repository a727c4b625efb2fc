"""What `make venv` installs: the packages compiled to bytecode at install."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.parametrize("module", ["prefect", "airbyte", "airbyte_cdk", "pandas", "sqlalchemy", "dbt.version"])
def test_the_venvs_packages_are_compiled_at_install(module: str) -> None:
    """Where PYTHONDONTWRITEBYTECODE is set (CI, the Docker image), Python never keeps what it
    compiles: a package installed without bytecode is compiled again by every process of every
    run that imports it (PyAirbyte's, Prefect's and dbt's imports about twice as slow)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    cached = Path(importlib.util.cache_from_source(spec.origin))
    assert cached.exists(), f"{spec.origin} has no bytecode: `make venv` installs with uv pip sync --compile-bytecode"
