"""PyAirbyte imported with only its DuckDB cache: the stand-ins, the absent optional backends,
and that other threads import as usual. The fast tests use a small package written for them; the
slow one imports the real PyAirbyte the way a run does."""

import builtins
import contextlib
import importlib
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from elt.extract.pyairbyte_imports import NotLoaded, only_what_duckdb_needs, without_dataframe_libraries


def _package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str, files: dict[str, str]) -> Iterator[str]:
    """A package `<prefix>_<test>` of `files` (name: source, `{name}` filled in) on sys.path for
    one test; its modules leave `sys.modules` after it."""
    name = f"{prefix}_{tmp_path.name.replace('-', '_')}"
    root = tmp_path / name
    root.mkdir()
    for file, source in files.items():
        (root / file).write_text(source.replace("{name}", name))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[module]


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`shop`: its __init__ imports a heavy cache (which refuses to run, and names what it would
    import) and tries an optional backend, as airbyte and requests_cache do."""
    init = textwrap.dedent(
        """
        from {name}.heavy import HeavyCache
        from {name}.light import LightCache
        try:
            from {name}.optional import Backend
        except ImportError as error:
            Backend = None
            why_not = str(error)
        """
    )
    yield from _package(
        tmp_path,
        monkeypatch,
        "shop",
        {
            "__init__.py": init,
            "heavy.py": "raise AssertionError('the heavy cache was imported')\n",
            "light.py": "class LightCache: pass\n",
            "optional.py": "class Backend: pass\n",
        },
    )


def test_the_stand_in_is_imported_and_its_classes_refuse_to_be_used_naming_why(package: str) -> None:
    with only_what_duckdb_needs(stand_ins=[f"{package}.heavy"], absent=[]):
        shop = importlib.import_module(package)

    assert shop.LightCache.__module__ == f"{package}.light"
    with pytest.raises(RuntimeError) as error:
        shop.HeavyCache(project_name="x")
    assert str(error.value) == (
        f"{package}.heavy.HeavyCache is not loaded: elt imports PyAirbyte with only its DuckDB cache "
        "(elt.extract.pyairbyte_imports)"
    )
    assert shop.HeavyCache is sys.modules[f"{package}.heavy"].HeavyCache


def test_an_absent_module_is_an_import_error_the_package_handles(package: str) -> None:
    with only_what_duckdb_needs(stand_ins=[f"{package}.heavy"], absent=[f"{package}.optional"]):
        shop = importlib.import_module(package)

    assert shop.Backend is None
    assert shop.why_not == f"{package}.optional is left out of the embedded backend's PyAirbyte"
    assert f"{package}.optional" not in sys.modules


def test_another_threads_imports_meanwhile_are_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    heavy, optional = f"heavy_{tmp_path.name}".replace("-", "_"), f"optional_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{heavy}.py").write_text("raise AssertionError('the heavy cache was imported')\n")
    (tmp_path / f"{optional}.py").write_text("class Backend: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    outcomes: list[str] = []

    def import_both() -> None:
        outcomes.append(importlib.import_module(optional).Backend.__module__)
        try:
            importlib.import_module(heavy)
        except AssertionError as error:
            outcomes.append(str(error))

    try:
        with only_what_duckdb_needs(stand_ins=[heavy], absent=[optional]):
            thread = threading.Thread(target=import_both)
            thread.start()
            thread.join(timeout=30)
            assert not thread.is_alive()
    finally:
        sys.modules.pop(optional, None)

    assert outcomes == [optional, "the heavy cache was imported"]


def test_after_the_block_imports_are_as_before_even_when_it_raised(package: str) -> None:
    finders = list(sys.meta_path)
    with pytest.raises(ZeroDivisionError), only_what_duckdb_needs(stand_ins=[f"{package}.heavy"], absent=[]):
        raise ZeroDivisionError
    assert sys.meta_path == finders

    with pytest.raises(AssertionError, match="the heavy cache was imported"):
        importlib.import_module(package)


def test_a_stand_in_has_no_dunder_names_so_tools_that_probe_them_see_a_plain_module(package: str) -> None:
    with only_what_duckdb_needs(stand_ins=[f"{package}.heavy"], absent=[]):
        importlib.import_module(package)
    heavy = sys.modules[f"{package}.heavy"]
    assert not hasattr(heavy, "__all__")
    assert not hasattr(heavy, "__path__")


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`client`: a package whose __init__ imports its models, as airbyte_api does."""
    yield from _package(
        tmp_path,
        monkeypatch,
        "client",
        {"__init__.py": "from . import models\nfrom .models import Thing\n", "models.py": "class Thing: pass\n"},
    )


def _loaded(package: str) -> list[str]:
    return sorted(m for m in sys.modules if m == package or m.startswith(f"{package}."))


def test_a_package_dropped_after_the_block_is_imported_whole_by_the_next_import(client: str) -> None:
    """What elt's server backend needs: the real airbyte_api, though PyAirbyte got a stand-in for its models."""
    with only_what_duckdb_needs(stand_ins=[f"{client}.models"], absent=[], dropped_after=[client]):
        within = importlib.import_module(client)
    assert issubclass(within.Thing, NotLoaded)
    assert _loaded(client) == []

    after = importlib.import_module(client)
    assert after is not within
    assert after.Thing.__module__ == f"{client}.models"
    assert not issubclass(after.Thing, NotLoaded)


def test_a_dropped_package_imported_before_the_block_is_kept(client: str) -> None:
    before = importlib.import_module(client)
    with only_what_duckdb_needs(stand_ins=[f"{client}.models"], absent=[], dropped_after=[client]):
        within = importlib.import_module(client)
    assert within is before
    assert _loaded(client) == [client, f"{client}.models"]
    assert not issubclass(within.Thing, NotLoaded)


@pytest.fixture
def sdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`sdk`: its __init__ imports everything it has to re-export it (as airbyte_cdk's does) and
    counts its runs; `sdk.models` is the light submodule a user imports."""
    init = (
        "import builtins\n"
        "builtins.{name}_inits = getattr(builtins, '{name}_inits', 0) + 1\n"
        "from .heavy import Engine\n"
        "from .models import Record\n"
        "VERSION = '1.0'\n"
    )
    files = {"__init__.py": init, "heavy.py": "class Engine: pass\n", "models.py": "class Record: pass\n"}
    for name in _package(tmp_path, monkeypatch, "sdk", files):
        yield name
        with contextlib.suppress(AttributeError):
            delattr(builtins, f"{name}_inits")


def test_a_deferred_packages_submodule_imports_without_its_init(sdk: str) -> None:
    with only_what_duckdb_needs(stand_ins=[], absent=[], dropped_after=[], init_deferred=[sdk]):
        from_models = importlib.import_module(f"{sdk}.models").Record

    assert from_models.__module__ == f"{sdk}.models"
    assert getattr(builtins, f"{sdk}_inits", 0) == 0
    assert _loaded(sdk) == [sdk, f"{sdk}.models"]


def test_a_deferred_packages_init_runs_once_when_one_of_its_names_is_asked_for(sdk: str) -> None:
    with only_what_duckdb_needs(stand_ins=[], absent=[], dropped_after=[], init_deferred=[sdk]):
        importlib.import_module(f"{sdk}.models")
    package = importlib.import_module(sdk)

    assert package.VERSION == "1.0"
    assert package.Engine.__module__ == f"{sdk}.heavy"
    assert package.Record is sys.modules[f"{sdk}.models"].Record
    assert getattr(builtins, f"{sdk}_inits") == 1
    with pytest.raises(AttributeError, match=f"module '{sdk}' has no attribute 'Missing'"):
        package.Missing  # noqa: B018 - the attribute access is the test
    assert getattr(builtins, f"{sdk}_inits") == 1


def test_a_deferred_init_that_raised_raises_again_when_asked_again(sdk: str, tmp_path: Path) -> None:
    (tmp_path / sdk / "heavy.py").write_text("raise ImportError('heavy needs a library that is not installed')\n")
    with only_what_duckdb_needs(stand_ins=[], absent=[], dropped_after=[], init_deferred=[sdk]):
        package = importlib.import_module(sdk)

    for _ in range(2):
        with pytest.raises(ImportError, match="heavy needs a library that is not installed"):
            package.VERSION  # noqa: B018 - the attribute access is the test


def test_a_stand_in_package_holds_its_stand_in_submodules(tmp_path: Path) -> None:
    name = f"frames_{tmp_path.name.replace('-', '_')}"
    try:
        with only_what_duckdb_needs(stand_ins=[name, f"{name}.dataset"], absent=[], dropped_after=[name]):
            dataset = importlib.import_module(f"{name}.dataset")
        assert issubclass(dataset.Dataset, NotLoaded)
        assert _loaded(name) == []
    finally:
        for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            del sys.modules[module]


@pytest.mark.slow
def test_the_runs_pyairbyte_has_its_duckdb_cache_and_none_of_the_other_warehouses_clients() -> None:
    """The real `import airbyte` as a sync makes it, in a fresh interpreter, without pandas,
    pyarrow or the CDK's declarative sources; after it, the Airbyte API client the server backend
    imports, pandas and airbyte_cdk's own names are the real ones."""
    script = textwrap.dedent(
        """
        import sys
        from elt.extract import embedded
        airbyte = embedded._import_pyairbyte()
        print(airbyte.DuckDBCache.__module__, airbyte.get_source.__module__)
        heavy = ["google.cloud.bigquery", "google.cloud.secretmanager_v1", "snowflake.connector",
                 "psycopg2", "psycopg", "boto3", "redis", "pymongo"]
        heavy += ["pandas", "pyarrow", "airbyte_cdk.sources.declarative", "airbyte_cdk.entrypoint"]
        print([name for name in heavy if name in sys.modules])
        try:
            airbyte.caches.SnowflakeCache(account="x")
        except RuntimeError as error:
            print(error)
        from elt.extract.pyairbyte_imports import NotLoaded
        print(issubclass(airbyte.caches.duckdb.DestinationDuckdb, NotLoaded))
        print([name for name in sys.modules if name.split(".")[0] == "airbyte_api"])
        from elt.extract import server
        print(server.models.DestinationDuckdb.__module__)
        import pandas, airbyte_cdk
        print(pandas.DataFrame({"rows": [1, 2]}).shape, airbyte_cdk.AirbyteEntrypoint.__module__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.splitlines() == [
        "airbyte.caches.duckdb airbyte.sources.util",
        "[]",
        "airbyte.caches.snowflake.SnowflakeCache is not loaded: elt imports PyAirbyte with only its DuckDB "
        "cache (elt.extract.pyairbyte_imports)",
        "True",
        "[]",
        "airbyte_api.models.destination_duckdb",
        "(2, 1) airbyte_cdk.entrypoint",
    ]


def test_without_dataframe_libraries_this_threads_import_fails_and_others_and_later_ones_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = f"frames_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{frames}.py").write_text("class DataFrame: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    in_other_thread: list[str] = []
    try:
        with without_dataframe_libraries([frames]):
            with pytest.raises(ImportError, match=f"{frames} is left out"):
                importlib.import_module(frames)
            thread = threading.Thread(target=lambda: in_other_thread.append(importlib.import_module(frames).__name__))
            thread.start()
            thread.join(timeout=30)
            sys.modules.pop(frames)
        assert in_other_thread == [frames]
        assert importlib.import_module(frames).DataFrame.__module__ == frames
    finally:
        sys.modules.pop(frames, None)


@pytest.mark.slow
def test_an_embedded_sync_loads_its_rows_without_importing_pandas_numpy_or_pyarrow(tmp_path: Path) -> None:
    """A real source-faker sync through PyAirbyte into real DuckDB, in a fresh interpreter as a
    run makes it: DuckDB's Python client would import pandas to bind duckdb_engine's parameters.
    After the sync, pandas imports and DuckDB hands it a DataFrame."""
    from tests.conftest import CONNECTORS_DIR

    connections = tmp_path / "connections.yaml"
    connections.write_text(
        "connections:\n"
        "  - name: faker\n"
        "    source: {connector: source-faker, pip: airbyte-source-faker==7.2.1, config: {count: 40, seed: 42, parallelism: 1}}\n"
        "    streams: [users, products]\n"
        "    destination: {schema: raw_faker}\n"
    )
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from elt.extract.embedded import EmbeddedBackend
        from elt.settings import load_settings
        settings = load_settings(home=Path({str(tmp_path)!r}), airbyte_connections_file=Path({str(connections)!r}),
                                 connectors_dir=Path({str(CONNECTORS_DIR)!r}))
        backend = EmbeddedBackend(settings)
        result = backend.sync("faker", full_refresh=False)
        print(result.rows_per_stream)
        print([name for name in ("pandas", "numpy", "pyarrow") if name in sys.modules])
        import duckdb, pandas
        with duckdb.connect(str(settings.path(settings.duckdb_path)), read_only=True) as connection:
            frame = connection.execute("select count(*) as users from raw_faker.users").df()
        print(type(frame).__name__, int(frame.users[0]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-3:] == ["{'users': 40, 'products': 40}", "[]", "DataFrame 40"]
