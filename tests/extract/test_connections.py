"""`airbyte/connections.yaml`: the shipped file loads, and each kind of mistake is one line naming file, connection and field."""

from pathlib import Path

import pytest

from elt.extract.connections import ConnectionsFileError, load_connections, resolve_config, unset_references
from tests.conftest import REPO_ROOT


def test_shipped_file_defines_the_faker_connection() -> None:
    (faker,) = load_connections(REPO_ROOT / "airbyte" / "connections.yaml")
    assert faker.name == "faker"
    assert faker.source.connector == "source-faker"
    assert faker.streams == ["users", "products", "purchases"]
    assert faker.destination.schema_ == "raw_faker"


GOOD = """
connections:
  - name: shop
    source: {connector: source-faker, pip: airbyte-source-faker, config: {count: 5}}
    streams: [users]
    destination: {schema: raw_shop}
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("connections: [", "line 1: not valid YAML: expected the node content, but found '<stream end>'"),
        ("connections:\n  - name: shop\n  bad: [\n", "line 3: not valid YAML: expected <block end>, but found '?'"),
        ("", "connections: Field required"),
        ("connections: \x07", "not valid YAML: unacceptable character #x0007: special characters are not allowed"),
        ("- a\n- b\n", "(top level): Input should be a valid dictionary or instance of _ConnectionsFile"),
        ("connections:\n  - streams: [users]\n", "connection #1: name: Field required (and 2 more problems)"),
        (GOOD + "  - plain\n", "connections.1: Input should be a valid dictionary"),
        (
            GOOD.replace("schema: raw_shop", "schema: raw_shop, colour: red"),
            "connection 'shop': destination.colour: unknown key (known keys: schema)",
        ),
        (
            GOOD.replace("streams: [users]", "streams: [users]\n    colour: red"),
            "connection 'shop': colour: unknown key (known keys: name, source, streams, destination, enabled)",
        ),
        ("{}", "connections: Field required"),
        (
            GOOD.replace("connector: source-faker", "connector: faker"),
            "connection 'shop': source.connector: 'faker' does not match ^source-[a-z0-9][a-z0-9-]*$",
        ),
        (GOOD.replace("    streams: [users]\n", ""), "connection 'shop': streams: Field required"),
        (
            GOOD.replace("streams: [users]", "streams: []"),
            "connection 'shop': streams: Value error, list at least one stream, or '*' for all",
        ),
        (
            GOOD.replace("schema: raw_shop", "schema: raw-shop"),
            "connection 'shop': destination.schema: Value error, 'raw-shop' is not a plain SQL identifier",
        ),
        (
            GOOD.replace("pip: airbyte-source-faker", "pipp: airbyte-source-faker"),
            "connection 'shop': source.pipp: unknown key; did you mean 'pip'?",
        ),
        (
            GOOD.replace("streams: [users]", "stream: [users]"),
            "connection 'shop': stream: unknown key; did you mean 'streams'? (and 1 more problems)",
        ),
        (
            GOOD.replace("schema: raw_shop", "shema: raw_shop"),
            "connection 'shop': destination.shema: unknown key; did you mean 'schema'? (and 1 more problems)",
        ),
        (
            GOOD.replace("source: {", "source: {colour: red, "),
            "connection 'shop': source.colour: unknown key (known keys: connector, pip, executable, config)",
        ),
        (
            GOOD.replace("connections:", "connection:"),
            "connection: unknown key; did you mean 'connections'? (and 1 more problems)",
        ),
        (GOOD + GOOD.replace("connections:\n", ""), "connection 'shop': name: defined twice"),
    ],
)
def test_mistakes_are_one_line_naming_file_connection_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "connections.yaml"
    path.write_text(text)
    with pytest.raises(ConnectionsFileError) as error:
        load_connections(path)
    assert str(error.value) == f"{path}: {expected}"


def test_missing_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConnectionsFileError, match="ELT_AIRBYTE_CONNECTIONS_FILE"):
        load_connections(tmp_path / "absent.yaml")


def test_config_references_are_filled_from_the_environment(tmp_path: Path) -> None:
    """`${VAR}` keeps secrets out of the file; an unset one names the variable, not its value."""
    path = tmp_path / "connections.yaml"
    path.write_text(GOOD.replace("count: 5", "count: 5, api_key: '${SHOP_KEY}'"))
    (shop,) = load_connections(path)
    assert resolve_config(shop, {"SHOP_KEY": "k-123"}) == {"count": 5, "api_key": "k-123"}
    path.write_text(GOOD.replace("count: 5", "count: 5, auth: {key: 'Bearer ${SHOP_KEY}'}, hosts: ['${SHOP_KEY}.example', 443]"))
    (shop,) = load_connections(path)
    assert resolve_config(shop, {"SHOP_KEY": "k-123"}) == {
        "count": 5,
        "auth": {"key": "Bearer k-123"},
        "hosts": ["k-123.example", 443],
    }
    with pytest.raises(ConnectionsFileError, match=r"connection 'shop': source.config refers to \$\{SHOP_KEY\}"):
        resolve_config(shop, {})


def test_unset_references_are_found_before_any_sync(tmp_path: Path) -> None:
    """Every `${VAR}` anywhere in a source config, nested or in a list, with the key that holds it."""
    path = tmp_path / "connections.yaml"
    path.write_text(GOOD.replace("count: 5", "count: 5, auth: {token: 'Bearer ${SHOP_TOKEN}'}, hosts: ['${SHOP_HOST}', plain]"))
    (shop,) = load_connections(path)
    assert unset_references(shop, {}) == [("source.config.auth.token", "SHOP_TOKEN"), ("source.config.hosts[0]", "SHOP_HOST")]
    assert unset_references(shop, {"SHOP_TOKEN": "t", "SHOP_HOST": "h"}) == []
