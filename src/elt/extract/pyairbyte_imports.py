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

pandas and pyarrow (72 MB of the run's memory) are stand-ins too, and dropped after the block
the same way: PyAirbyte uses them to read a cache into DataFrames and in its generic SQL loader;
its DuckDB loader reads the staged files with DuckDB itself. Its in-process runner for
manifest-only connectors (`airbyte._executors.declarative`) is a stand-in: elt runs every
connector in its own virtualenv, as a process.

`airbyte_cdk`'s `__init__` imports the whole CDK (declarative sources, file-based sources and
their parsers: 51 MB, 1 s) to re-export its names; PyAirbyte imports only a few of its
submodules (protocol models, date helpers). Within the block, the `__init__` of such a package
(`INIT_DEFERRED`) runs only when one of its own names is first asked for, in or after the block;
its submodules import as usual.
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
    "airbyte._executors.declarative",
    "airbyte.caches.bigquery",
    "airbyte.caches.motherduck",
    "airbyte.caches.postgres",
    "airbyte.caches.snowflake",
    "airbyte.secrets.google_gsm",
    "airbyte_api.models",
    "pandas",
    "pyarrow",
    "pyarrow.dataset",
)
DROPPED_AFTER = ("airbyte_api", "pandas", "pyarrow")
INIT_DEFERRED = ("airbyte_cdk", "airbyte_cdk.utils")
DATAFRAME_LIBRARIES = ("numpy", "pandas", "pyarrow")
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


class _InitDeferred(ModuleType):
    """A package whose `__init__` has not run: its submodules import as usual, and the first
    name asked of it that it does not hold yet runs the `__init__` (once, unless it raised)."""

    def __init__(self, name: str, real: importlib.machinery.ModuleSpec) -> None:
        super().__init__(name)
        self.__dict__["_elt_real_spec"] = real
        self.__dict__["_elt_init_lock"] = threading.RLock()
        self.__dict__["_elt_init_state"] = "deferred"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name != "__all__":
            raise AttributeError(name)
        with self._elt_init_lock:
            if self.__dict__["_elt_init_state"] != "deferred":  # ran, or running: `from . import x` asks first
                raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
            self.__dict__["_elt_init_state"] = "running"
            try:
                self._elt_real_spec.loader.exec_module(self)
            except BaseException:
                self.__dict__["_elt_init_state"] = "deferred"
                raise
            self.__dict__["_elt_init_state"] = "ran"
        return getattr(self, name)


class _DuckDBOnly(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, stand_ins: Sequence[str], absent: Sequence[str], init_deferred: Sequence[str]) -> None:
        self._stand_ins = frozenset(stand_ins)
        self._absent = frozenset(absent)
        self._init_deferred = frozenset(init_deferred)
        self._thread = threading.get_ident()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if threading.get_ident() != self._thread:
            return None
        if fullname in self._absent:
            raise ImportError(f"{fullname} is left out of the embedded backend's PyAirbyte", name=fullname)
        if fullname in self._stand_ins:
            spec = importlib.machinery.ModuleSpec(fullname, self)
            if any(other.startswith(f"{fullname}.") for other in self._stand_ins):
                spec.submodule_search_locations = []  # a package, so that its stand-in submodules import
            return spec
        if fullname in self._init_deferred:
            real = importlib.machinery.PathFinder.find_spec(fullname, path)
            if real is None or real.submodule_search_locations is None or real.loader is None:
                return None
            spec = importlib.machinery.ModuleSpec(fullname, self, origin=real.origin, loader_state=real, is_package=True)
            spec.submodule_search_locations = real.submodule_search_locations
            spec.has_location = real.has_location
            spec.cached = real.cached
            return spec
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        if isinstance(spec.loader_state, importlib.machinery.ModuleSpec):
            return _InitDeferred(spec.name, spec.loader_state)
        return _StandIn(spec.name)

    def exec_module(self, module: ModuleType) -> None:
        pass


@contextlib.contextmanager
def without_dataframe_libraries(packages: Sequence[str] = DATAFRAME_LIBRARIES) -> Iterator[None]:
    """DuckDB's Python client imports pandas (with numpy and pyarrow: 85 MB) the first time it
    binds a query's parameters, to see whether one is a DataFrame; duckdb_engine binds some when
    PyAirbyte creates its cache. A sync has no DataFrames. Within this block, this thread's
    imports of `packages` raise ImportError, which DuckDB takes for 'not installed'; other
    threads, and this one after the block, import them as usual (DuckDB then finds them)."""
    finder = _DuckDBOnly(stand_ins=(), absent=packages, init_deferred=())
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


@contextlib.contextmanager
def only_what_duckdb_needs(
    stand_ins: Sequence[str] = UNUSED_BY_THE_DUCKDB_PATH,
    absent: Sequence[str] = OPTIONAL_HTTP_CACHE_BACKENDS,
    dropped_after: Sequence[str] = DROPPED_AFTER,
    init_deferred: Sequence[str] = INIT_DEFERRED,
) -> Iterator[None]:
    """Within this block, imports made by this thread get stand-ins for `stand_ins`, an
    ImportError for `absent`, and the packages `init_deferred` without running their `__init__`
    yet; other threads import as usual. At its end, the modules of the `dropped_after` packages
    imported within it leave `sys.modules`, stand-ins included."""
    finder = _DuckDBOnly(stand_ins, absent, init_deferred)
    imported_before = set(sys.modules.copy())
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in set(sys.modules.copy()) - imported_before:
            if any(name == package or name.startswith(f"{package}.") for package in dropped_after):
                sys.modules.pop(name, None)
