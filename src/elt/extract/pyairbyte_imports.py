"""Import PyAirbyte with only what the embedded backend's DuckDB path needs.

`import airbyte` imports every cache PyAirbyte ships, each with its warehouse's client
(BigQuery and Google's Secret Manager, Snowflake, Postgres, MotherDuck), and airbyte_cdk's HTTP
cache imports its optional Redis, DynamoDB and MongoDB backends (boto3, redis, pymongo): 3,700
modules, 10-18 s on these machines. The embedded backend writes to DuckDB and uses none of them.
While `import airbyte` runs, in the importing thread only, those caches are stand-in modules
and requests_cache's optional backends are absent, as if their packages were not installed,
which requests_cache is written for. A stand-in's class says why it cannot be used.

`airbyte_api.models` (the Airbyte API's request and response types: 1-1.5 s to import here) is a
stand-in too: the DuckDB cache only names its destination type, for Airbyte Cloud. elt's server
backend drives that API, so at the block's end every `airbyte_api` module imported within it is
dropped from `sys.modules`: PyAirbyte keeps what it was given, and the next `import airbyte_api`
loads the real package whole. (A run uses one backend, so no other thread imports it meanwhile.)
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

UNUSED_BY_THE_DUCKDB_PATH = (
    "airbyte.caches.bigquery",
    "airbyte.caches.motherduck",
    "airbyte.caches.postgres",
    "airbyte.caches.snowflake",
    "airbyte.secrets.google_gsm",
    "airbyte_api.models",
)
DROPPED_AFTER = ("airbyte_api",)
OPTIONAL_HTTP_CACHE_BACKENDS = (
    "requests_cache.backends.dynamodb",
    "requests_cache.backends.gridfs",
    "requests_cache.backends.mongodb",
    "requests_cache.backends.redis",
)


class NotLoaded:
    """What a stand-in module gives for any name: a class that refuses to be used."""

    module = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"{self.module}.{type(self).__name__} is not loaded: elt imports PyAirbyte with only "
            "its DuckDB cache (elt.extract.pyairbyte_imports)"
        )


class _StandIn(ModuleType):
    def __getattr__(self, name: str) -> type[NotLoaded]:
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (NotLoaded,), {"module": self.__name__, "__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


class _DuckDBOnly(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, stand_ins: Sequence[str], absent: Sequence[str]) -> None:
        self._stand_ins = frozenset(stand_ins)
        self._absent = frozenset(absent)
        self._thread = threading.get_ident()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if threading.get_ident() != self._thread:
            return None
        if fullname in self._absent:
            raise ImportError(f"{fullname} is left out of the embedded backend's PyAirbyte", name=fullname)
        if fullname in self._stand_ins:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return _StandIn(spec.name)

    def exec_module(self, module: ModuleType) -> None:
        pass


@contextlib.contextmanager
def only_what_duckdb_needs(
    stand_ins: Sequence[str] = UNUSED_BY_THE_DUCKDB_PATH,
    absent: Sequence[str] = OPTIONAL_HTTP_CACHE_BACKENDS,
    dropped_after: Sequence[str] = DROPPED_AFTER,
) -> Iterator[None]:
    """Within this block, imports made by this thread get stand-ins for `stand_ins` and an
    ImportError for `absent`; other threads import as usual. At its end, the modules of the
    `dropped_after` packages imported within it leave `sys.modules`, stand-ins included."""
    finder = _DuckDBOnly(stand_ins, absent)
    imported_before = set(sys.modules.copy())
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in set(sys.modules.copy()) - imported_before:
            if any(name == package or name.startswith(f"{package}.") for package in dropped_after):
                sys.modules.pop(name, None)
