"""Snowflake credentials: every accepted form of the private key, the password, and the errors.

Keys are real RSA keys generated here; the connection tests use fakesnow's server, which accepts
any credentials: they prove the connector takes what we build, not that Snowflake would
authenticate it (only a real account checks the key against the user's RSA_PUBLIC_KEY).
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from elt import dbt_runner, warehouse_snowflake
from elt.errors import ConfigurationError
from elt.settings import load_settings
from elt.warehouse import WarehouseUnreachable, warehouse_for
from elt.warehouse_snowflake import SnowflakeCredentials
from tests.conftest import BIN, FakesnowServer


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _der(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem(key: rsa.RSAPrivateKey, passphrase: str | None = None) -> str:
    encryption = serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption).decode()


def _body(pem: str) -> str:
    return "".join(line for line in pem.splitlines() if not line.startswith("-----"))


def test_every_accepted_form_gives_the_same_key(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    expected = _der(key)
    encrypted = _pem(key, "s3cr3t@pass")
    (tmp_path / "rsa_key.p8").write_text(encrypted)
    (tmp_path / "plain.pem").write_text(_pem(key))
    forms = {
        "pem": (_pem(key), None),
        "pem with escaped newlines (.env style)": (_pem(key).replace("\n", "\\n"), None),
        "base64 body": (_body(_pem(key)), None),
        "encrypted pem": (encrypted, "s3cr3t@pass"),
        "encrypted base64 body": (_body(encrypted), "s3cr3t@pass"),
        "path to encrypted pem": (str(tmp_path / "rsa_key.p8"), "s3cr3t@pass"),
        "path to pem": (str(tmp_path / "plain.pem"), None),
    }
    for form, (value, passphrase) in forms.items():
        assert warehouse_snowflake.private_key_der(value, passphrase) == expected, form


@pytest.mark.parametrize(
    ("value", "passphrase", "message"),
    [
        ("not a key at all!", None, "SNOWFLAKE_PRIVATE_KEY is not a key; expected a PEM"),
        ("QUJD" * 30, None, "SNOWFLAKE_PRIVATE_KEY (base64 body) is not a valid private key; expected a PEM"),
        ("/no/such/key.p8", None, "SNOWFLAKE_PRIVATE_KEY looks like a path, but /no/such/key.p8 is not a file"),
        ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----", None, "(PEM) is not a valid private key"),
    ],
)
def test_malformed_key_says_which_forms_are_expected(value: str, passphrase: str | None, message: str) -> None:
    with pytest.raises(warehouse_snowflake.SnowflakeKeyError) as error:
        warehouse_snowflake.private_key_der(value, passphrase)
    assert message in str(error.value)
    if not value.startswith("/no/such"):
        assert value not in str(error.value)


def test_key_never_appears_in_an_error(key: rsa.RSAPrivateKey) -> None:
    """A body with a character missing (a bad paste) fails without echoing any of the key."""
    broken = _body(_pem(key))[:-7]
    with pytest.raises(warehouse_snowflake.SnowflakeKeyError) as error:
        warehouse_snowflake.private_key_der(broken)
    assert broken[:30] not in str(error.value) and broken[-30:] not in str(error.value)


def test_passphrase_problems_name_the_variables(key: rsa.RSAPrivateKey) -> None:
    encrypted = _pem(key, "right")
    with pytest.raises(warehouse_snowflake.SnowflakeKeyError, match="is encrypted: set SNOWFLAKE_PRIVATE_KEY_PASSPHRASE"):
        warehouse_snowflake.private_key_der(encrypted)
    with pytest.raises(
        warehouse_snowflake.SnowflakeKeyError, match="could not be read with SNOWFLAKE_PRIVATE_KEY_PASSPHRASE"
    ) as error:
        warehouse_snowflake.private_key_der(encrypted, "wrong")
    assert "right" not in str(error.value) and _body(encrypted)[:40] not in str(error.value)
    with pytest.raises(warehouse_snowflake.SnowflakeKeyError, match="key is not encrypted; unset it"):
        warehouse_snowflake.private_key_der(_pem(key), "unneeded")


def test_key_pair_profile_gives_dbt_base64_der_through_the_environment(
    key: rsa.RSAPrivateKey, snowflake_env: FakesnowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SNOWFLAKE_PASSWORD")
    monkeypatch.setenv("SNOWFLAKE_PRIVATE_KEY", _pem(key, "pp"))
    monkeypatch.setenv("SNOWFLAKE_PRIVATE_KEY_PASSPHRASE", "pp")
    settings = load_settings()
    rendered = dbt_runner.render_profile(settings, "any_profile")
    output = yaml.safe_load(rendered)["any_profile"]["outputs"]["snowflake"]
    assert output["private_key"] == "{{ env_var('ELT_SNOWFLAKE_PRIVATE_KEY_DER_BASE64') }}"
    assert "password" not in output and "private_key_passphrase" not in output
    assert _body(_pem(key))[:40] not in rendered
    assert base64.b64decode(dbt_runner.dbt_environment(settings)[warehouse_snowflake.DBT_KEY_VARIABLE]) == _der(key)
    assert SnowflakeCredentials.from_settings(settings).to_connector_params()["private_key"] == _der(key)


def test_connector_connects_with_the_settings(snowflake_env: FakesnowServer) -> None:
    with warehouse_snowflake.connect(
        SnowflakeCredentials.from_settings(load_settings()), warehouse_snowflake.query_tag("run-1")
    ) as connection:
        assert connection.cursor().execute("select 41 + 1").fetchone() == (42,)


def test_missing_settings_are_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELT_WAREHOUSE", "snowflake")
    monkeypatch.setenv("SNOWFLAKE_ACCOUNT", "acme")
    with pytest.raises(
        ConfigurationError,
        match="needs SNOWFLAKE_USER, SNOWFLAKE_WAREHOUSE, SNOWFLAKE_DATABASE, SNOWFLAKE_PRIVATE_KEY or SNOWFLAKE_PASSWORD",
    ):
        SnowflakeCredentials.from_settings(load_settings()).to_connector_params()


def _closed_port() -> int:
    """A local port nothing listens on: bound, read, closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unreachable_env(port: int) -> dict[str, str]:
    return {
        "ELT_WAREHOUSE": "snowflake",
        "SNOWFLAKE_ACCOUNT": "acme-test",
        "SNOWFLAKE_USER": "TRANSFORMER",
        "SNOWFLAKE_PASSWORD": "p@ss:w/rd",
        "SNOWFLAKE_WAREHOUSE": "TRANSFORMING",
        "SNOWFLAKE_DATABASE": "ANALYTICS",
        "SNOWFLAKE_HOST": "127.0.0.1",
        "SNOWFLAKE_PORT": str(port),
        "SNOWFLAKE_PROTOCOL": "http",
    }


def test_closed_port_is_named_with_the_settings_to_check(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    for name, value in _unreachable_env(port).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(WarehouseUnreachable) as error:
        warehouse_for(load_settings()).check_reachable()
    assert str(error.value).startswith(
        f"cannot connect to Snowflake account acme-test at http://127.0.0.1:{port} as TRANSFORMER: 250001: Could not connect to Snowflake backend"
    )
    assert str(error.value).endswith(
        " (check SNOWFLAKE_ACCOUNT, SNOWFLAKE_HOST/SNOWFLAKE_PORT and the network; SNOWFLAKE_CONNECT_TIMEOUT_SECONDS=10)"
    )
    assert "p@ss:w/rd" not in str(error.value)


def test_host_that_never_answers_fails_within_the_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener that accepts connections but never replies (a hung proxy, a firewall that
    swallows packets): the check gives up after SNOWFLAKE_CONNECT_TIMEOUT_SECONDS, not after the
    connector's 60 s read timeout. The deadline below fails the test when it does not."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        for name, value in _unreachable_env(silent.getsockname()[1]).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("SNOWFLAKE_CONNECT_TIMEOUT_SECONDS", "2")
        settings = load_settings()
        outcome: list[BaseException] = []
        checker = threading.Thread(target=lambda: _capture(outcome, warehouse_for(settings).check_reachable), daemon=True)
        checker.start()
        checker.join(timeout=40)
        assert not checker.is_alive(), "check_reachable did not give up within 40 s on a host that never answers"
    assert isinstance(outcome[0], WarehouseUnreachable), outcome
    assert "SNOWFLAKE_CONNECT_TIMEOUT_SECONDS=2" in str(outcome[0])


def _capture(outcome: list[BaseException], function, *args) -> None:
    try:
        function(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which asserts on it
        outcome.append(exc)


def test_one_bounded_login_for_dbt_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered dbt profile makes one login attempt bounded by the same setting."""
    for name, value in _unreachable_env(_closed_port()).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SNOWFLAKE_CONNECT_TIMEOUT_SECONDS", "2.5")
    output = yaml.safe_load(dbt_runner.render_profile(load_settings(), "p"))["p"]["outputs"]["snowflake"]
    assert output["connect_timeout"] == 3 and output["connect_retries"] == 0
    assert SnowflakeCredentials.from_settings(load_settings()).to_connector_params()["login_timeout"] == 2.5


def _cli(*arguments: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "elt"), *arguments], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_bad_key_stops_the_run_before_prefect_starts(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    """`elt run` parses the key in its pre-run check: exit 2 and one line, no flow run, no traceback."""
    env = _unreachable_env(_closed_port()) | {
        "SNOWFLAKE_PRIVATE_KEY": _pem(key, "right"),
        "SNOWFLAKE_PRIVATE_KEY_PASSPHRASE": "wrong",
        "ELT_HOME": str(tmp_path),
    }
    completed = _cli("run", "--skip-extract", "--skip-pull", env=env, cwd=tmp_path)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert completed.stderr.strip().splitlines() == [
        "error: SNOWFLAKE_PRIVATE_KEY (PEM) could not be read with SNOWFLAKE_PRIVATE_KEY_PASSPHRASE: "
        "a wrong passphrase, or not a key; expected a PEM (the '-----BEGIN ... KEY-----' block), its base64 body "
        "with the header, footer and newlines removed, or the path to a .p8/.pem file"
    ]
    assert "all-etl" not in completed.stdout + completed.stderr and "Traceback" not in completed.stderr


def test_unquoted_multiline_key_in_env_file_says_quote_it_or_give_a_path(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    """python-dotenv keeps only the first line of an unquoted multi-line value: the run stops
    before it starts, naming the fix, and no line of the key is printed."""
    pem = _pem(key)
    settings_lines = [
        f"{name}={value}" for name, value in _unreachable_env(_closed_port()).items() if name != "SNOWFLAKE_PASSWORD"
    ]
    (tmp_path / ".env").write_text("\n".join([*settings_lines, f"SNOWFLAKE_PRIVATE_KEY={pem}", "ELT_DBT_THREADS=2", ""]))
    completed = _cli("run", "--skip-extract", "--skip-pull", env={"ELT_HOME": str(tmp_path)}, cwd=tmp_path)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        'error: SNOWFLAKE_PRIVATE_KEY in .env: a multi-line key must be quoted (SNOWFLAKE_PRIVATE_KEY="-----BEGIN ..."), '
        "or give a path (SNOWFLAKE_PRIVATE_KEY=/path/to/rsa_key.p8)"
    ]
    assert len(completed.stderr.splitlines()) <= 3, completed.stderr  # dotenv's own warning, at most once
    body = _body(pem)
    assert body[:40] not in completed.stdout + completed.stderr

    # Quoted, the same key loads.
    (tmp_path / ".env").write_text("\n".join([*settings_lines, f'SNOWFLAKE_PRIVATE_KEY="{pem}"', ""]))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert SnowflakeCredentials.from_settings(load_settings()).to_connector_params()["private_key"] == _der(key)


def test_a_custom_dbt_target_name_still_gets_everything_snowflake_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """ELT_WAREHOUSE chooses the warehouse; ELT_DBT_TARGET only names the target. A Snowflake run
    under a target called `prod` still gets the Snowflake output under that name, the variables
    dbt-snowflake reads (a project's own profiles.yml too) and `elt doctor`'s grants check.
    The settings use their ELT_SNOWFLAKE_ names, so only the appliance can hand dbt the
    SNOWFLAKE_ variables (as with settings read from `.env`)."""
    from elt import doctor

    for name, value in {
        "ELT_WAREHOUSE": "snowflake",
        "ELT_DBT_TARGET": "prod",
        "ELT_SNOWFLAKE_ACCOUNT": "acme",
        "ELT_SNOWFLAKE_USER": "u",
        "ELT_SNOWFLAKE_WAREHOUSE": "w",
        "ELT_SNOWFLAKE_DATABASE": "d",
        "ELT_SNOWFLAKE_PASSWORD": "p@ss/w0rd@",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    profile = yaml.safe_load(dbt_runner.render_profile(settings, "p"))["p"]
    assert profile["target"] == "prod" and profile["outputs"]["prod"]["type"] == "snowflake"
    environment = dbt_runner.dbt_environment(settings)
    assert environment["SNOWFLAKE_PASSWORD"] == "p@ss/w0rd@" and environment["SNOWFLAKE_ACCOUNT"] == "acme"
    assert "snowflake grants" in [name for name, _, _ in doctor._checks(settings)]


def test_a_dbt_target_naming_the_other_warehouse_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """ELT_DBT_TARGET=snowflake with the default DuckDB warehouse would load one warehouse and
    build in another: the run stops naming the variable to set."""
    monkeypatch.setenv("ELT_DBT_TARGET", "snowflake")
    with pytest.raises(ConfigurationError) as error:
        warehouse_for(load_settings()).check_settings()
    assert str(error.value) == (
        "ELT_DBT_TARGET=snowflake but ELT_WAREHOUSE=duckdb: set ELT_WAREHOUSE=snowflake "
        "(ELT_WAREHOUSE chooses the warehouse; ELT_DBT_TARGET only names the dbt target)"
    )


def test_credentials_keep_their_secrets_out_of_str_and_repr(key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """The credentials object is what the code passes around: printing or logging it shows no
    password, key or passphrase; only the connector's arguments hold them."""
    pem = _pem(key, "pp-secret")
    for name, value in {
        "ELT_WAREHOUSE": "snowflake",
        "SNOWFLAKE_ACCOUNT": "acme",
        "SNOWFLAKE_USER": "u",
        "SNOWFLAKE_WAREHOUSE": "w",
        "SNOWFLAKE_DATABASE": "d",
        "SNOWFLAKE_PASSWORD": "p@ss/w0rd@",
        "SNOWFLAKE_PRIVATE_KEY": pem,
        "SNOWFLAKE_PRIVATE_KEY_PASSPHRASE": "pp-secret",
    }.items():
        monkeypatch.setenv(name, value)
    credentials = SnowflakeCredentials.from_settings(load_settings())
    for shown in (str(credentials), repr(credentials)):
        assert "p@ss/w0rd@" not in shown and "pp-secret" not in shown and _body(pem)[:40] not in shown, shown
    assert credentials.to_connector_params()["private_key"] == _der(key)


def test_password_profile_refers_dbt_to_a_variable_for_every_login_field_and_sets_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rendered profile holds no secret: each login field is an env_var() reference, and
    dbt's environment sets every variable the profile (or a project's own profiles.yml) reads."""
    for name, value in {
        "ELT_WAREHOUSE": "snowflake",
        "ELT_SNOWFLAKE_ACCOUNT": "acme",
        "ELT_SNOWFLAKE_USER": "u",
        "ELT_SNOWFLAKE_PASSWORD": "p@ss/w0rd@",
        "ELT_SNOWFLAKE_WAREHOUSE": "w",
        "ELT_SNOWFLAKE_DATABASE": "d",
        "ELT_DBT_THREADS": "3",
        "ELT_SNOWFLAKE_CONNECT_TIMEOUT_SECONDS": "2.5",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    rendered = dbt_runner.render_profile(settings, "p")
    assert "p@ss/w0rd@" not in rendered
    assert yaml.safe_load(rendered)["p"]["outputs"]["snowflake"] == {
        "type": "snowflake",
        "account": "{{ env_var('SNOWFLAKE_ACCOUNT') }}",
        "user": "{{ env_var('SNOWFLAKE_USER') }}",
        "warehouse": "{{ env_var('SNOWFLAKE_WAREHOUSE') }}",
        "database": "{{ env_var('SNOWFLAKE_DATABASE') }}",
        "schema": "{{ env_var('SNOWFLAKE_SCHEMA') }}",
        "query_tag": "{{ env_var('ELT_SNOWFLAKE_QUERY_TAG', 'elt') }}",
        "threads": 3,
        "connect_timeout": 3,
        "connect_retries": 0,
        "password": "{{ env_var('SNOWFLAKE_PASSWORD') }}",
    }
    assert SnowflakeCredentials.from_settings(settings).dbt_environment() == {
        "SNOWFLAKE_ACCOUNT": "acme",
        "SNOWFLAKE_USER": "u",
        "SNOWFLAKE_WAREHOUSE": "w",
        "SNOWFLAKE_DATABASE": "d",
        "SNOWFLAKE_SCHEMA": "ANALYTICS",
        "SNOWFLAKE_CONNECT_TIMEOUT_SECONDS": "3",
        "SNOWFLAKE_PASSWORD": "p@ss/w0rd@",
    }


@pytest.mark.parametrize(
    ("endpoint", "described"),
    [
        ({}, "Snowflake account acme at https://acme.snowflakecomputing.com:443"),
        ({"SNOWFLAKE_HOST": "10.0.0.5", "SNOWFLAKE_PROTOCOL": "http"}, "Snowflake account acme at http://10.0.0.5:80"),
        ({"SNOWFLAKE_HOST": "10.0.0.5", "SNOWFLAKE_PROTOCOL": "https"}, "Snowflake account acme at https://10.0.0.5:443"),
        ({"SNOWFLAKE_HOST": "10.0.0.5", "SNOWFLAKE_PORT": "8080"}, "Snowflake account acme at https://10.0.0.5:8080"),
    ],
    ids=["account", "http", "https", "port"],
)
def test_where_the_appliance_connects_names_the_port_the_protocol_implies(
    endpoint: dict[str, str], described: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    login = {"SNOWFLAKE_USER": "u", "SNOWFLAKE_PASSWORD": "p", "SNOWFLAKE_WAREHOUSE": "w", "SNOWFLAKE_DATABASE": "d"}
    for name, value in {"ELT_WAREHOUSE": "snowflake", "SNOWFLAKE_ACCOUNT": "acme", **login, **endpoint}.items():
        monkeypatch.setenv(name, value)
    assert SnowflakeCredentials.from_settings(load_settings()).describe() == described


@pytest.mark.parametrize(
    ("dotenv", "message"),
    [
        (None, "SNOWFLAKE_PRIVATE_KEY is a PEM cut off after its first line (no END line); expected "),
        (b"OTHER=caf\xe9\n", "SNOWFLAKE_PRIVATE_KEY is a PEM cut off after its first line (no END line); expected "),
        (b"OTHER=caf\xe9\nexport SNOWFLAKE_PRIVATE_KEY=-----BEGIN PRIVATE KEY-----\n", "SNOWFLAKE_PRIVATE_KEY in .env: "),
    ],
    ids=["no .env", ".env not UTF-8", "exported in .env"],
)
def test_a_pem_cut_off_after_its_first_line_says_why(
    dotenv: bytes | None, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wherever the key came from: no .env, one that is not UTF-8, a key `export`ed in .env."""
    monkeypatch.chdir(tmp_path)
    if dotenv is not None:
        (tmp_path / ".env").write_bytes(dotenv)
    with pytest.raises(warehouse_snowflake.SnowflakeKeyError) as error:
        warehouse_snowflake.private_key_der("-----BEGIN PRIVATE KEY-----")
    assert str(error.value).startswith(message)


def _der_encrypted(key: rsa.RSAPrivateKey, passphrase: str) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    )


def test_key_files_in_every_form_give_the_same_key_and_name_themselves_when_they_fail(
    key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    """A path to a DER file (plain or encrypted), a PEM file with a blank line first, a base64
    body wrapped over lines; and a wrong passphrase named with the form the key came in."""
    expected = _der(key)
    (tmp_path / "rsa_key.der").write_bytes(expected)
    (tmp_path / "encrypted.der").write_bytes(_der_encrypted(key, "pp"))
    (tmp_path / "encrypted.p8").write_text(_pem(key, "pp"))
    (tmp_path / "blank-first.pem").write_text("\n" + _pem(key))
    body = _body(_pem(key))
    wrapped = "\n".join(body[start : start + 64] for start in range(0, len(body), 64))
    assert warehouse_snowflake.private_key_der(str(tmp_path / "rsa_key.der")) == expected
    assert warehouse_snowflake.private_key_der(str(tmp_path / "encrypted.der"), "pp") == expected
    assert warehouse_snowflake.private_key_der(str(tmp_path / "blank-first.pem")) == expected
    assert warehouse_snowflake.private_key_der(wrapped) == expected
    wrong = "could not be read with SNOWFLAKE_PRIVATE_KEY_PASSPHRASE: a wrong passphrase, or not a key; expected a PEM"
    for value, form in [
        (str(tmp_path / "encrypted.der"), f"DER file {tmp_path / 'encrypted.der'}"),
        (str(tmp_path / "encrypted.p8"), f"PEM file {tmp_path / 'encrypted.p8'}"),
        (_body(_pem(key, "pp")), "base64 body"),
    ]:
        with pytest.raises(warehouse_snowflake.SnowflakeKeyError) as error:
            warehouse_snowflake.private_key_der(value, "wrong")
        assert str(error.value).startswith(f"SNOWFLAKE_PRIVATE_KEY ({form}) {wrong}"), str(error.value)


def test_passphrase_messages_are_whole(key: rsa.RSAPrivateKey) -> None:
    for value, passphrase, message in [
        (_pem(key, "right"), None, "SNOWFLAKE_PRIVATE_KEY is encrypted: set SNOWFLAKE_PRIVATE_KEY_PASSPHRASE"),
        (_pem(key), "unneeded", "SNOWFLAKE_PRIVATE_KEY_PASSPHRASE is set but the key is not encrypted; unset it"),
    ]:
        with pytest.raises(warehouse_snowflake.SnowflakeKeyError) as error:
            warehouse_snowflake.private_key_der(value, passphrase)
        assert str(error.value) == message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("QUJD" * 16, "SNOWFLAKE_PRIVATE_KEY is not a key; expected a PEM"),  # 64 characters: too short for a body
        ("QUJD" * 16 + "Q", "SNOWFLAKE_PRIVATE_KEY (base64 body) is truncated or damaged; expected a PEM"),
    ],
    ids=["64", "65"],
)
def test_a_base64_body_is_longer_than_64_characters(value: str, message: str) -> None:
    with pytest.raises(warehouse_snowflake.SnowflakeKeyError) as error:
        warehouse_snowflake.private_key_der(value)
    assert str(error.value).startswith(message), str(error.value)


def test_a_reachable_warehouse_passes_the_check(snowflake_env: FakesnowServer) -> None:
    """The check logs in and runs one query (fakesnow refuses SQL it cannot parse)."""
    warehouse = warehouse_for(load_settings())
    assert warehouse.name == "Snowflake"
    warehouse.check_reachable()


def test_outside_a_flow_run_dbt_gets_no_query_tag_and_no_run_cost_is_claimed(snowflake_env: FakesnowServer) -> None:
    """`elt doctor` or `elt dbt` outside a run: the profile's default tag applies, and the run's
    cost cannot be looked up (no tag names it)."""
    warehouse = warehouse_for(load_settings())
    assert warehouse_snowflake.root_flow_run_id() is None
    assert warehouse_snowflake.QUERY_TAG_VARIABLE not in warehouse.dbt_environment()
    assert warehouse.dbt_output()["threads"] == load_settings().dbt_threads
    with pytest.raises(warehouse_snowflake.QueryHistoryUnavailable) as error:
        warehouse.run_cost()
    assert str(error.value) == "not inside a flow run: no query tag to find this run's queries by"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/no/such/key", "SNOWFLAKE_PRIVATE_KEY looks like a path, but /no/such/key is not a file"),
        ("~/no-such-key", "SNOWFLAKE_PRIVATE_KEY looks like a path, but "),
        ("./no-such-key", "SNOWFLAKE_PRIVATE_KEY looks like a path, but no-such-key is not a file"),
        ("no-such-key.pem", "SNOWFLAKE_PRIVATE_KEY looks like a path, but no-such-key.pem is not a file"),
        ("rsa_key.p8", "SNOWFLAKE_PRIVATE_KEY looks like a path, but rsa_key.p8 is not a file"),
        ("rsa_key.der", "SNOWFLAKE_PRIVATE_KEY looks like a path, but rsa_key.der is not a file"),
        ("/" + "a-" * 255 + "a", "SNOWFLAKE_PRIVATE_KEY is not a key; expected a PEM"),  # 512 characters: no path
    ],
    ids=["absolute", "home", "relative", "extension", ".p8", ".der", "512"],
)
def test_a_value_that_looks_like_a_path_is_named_as_one(value: str, message: str) -> None:
    with pytest.raises(warehouse_snowflake.SnowflakeKeyError) as error:
        warehouse_snowflake.private_key_der(value)
    assert str(error.value).startswith(message), str(error.value)


def test_a_damaged_key_too_long_for_a_file_name_is_not_a_key_and_is_not_shown(key: rsa.RSAPrivateKey) -> None:
    """A key whose first line was lost (the body and the END line left) is neither a PEM nor a
    base64 body, so it is tried as a path; a part of it longer than a file name may be (255
    bytes) made that raise OSError "File name too long: '<the whole value>'"."""
    lost_first_line = "MIIE" + "A" * 300 + "\n-----END PRIVATE KEY-----"
    for value in [lost_first_line, _pem(key).split("\n", 1)[1].replace("/", "+")]:
        with pytest.raises(warehouse_snowflake.SnowflakeKeyError) as error:
            warehouse_snowflake.private_key_der(value)
        assert str(error.value).startswith("SNOWFLAKE_PRIVATE_KEY is not a key; expected a PEM"), str(error.value)
        assert value[:40] not in str(error.value)


def test_connector_arguments_of_a_password_login(monkeypatch: pytest.MonkeyPatch) -> None:
    """What snowflake.connector.connect gets: the login, bounded login and reads, the
    application name Snowflake shows in its history, the password, and the run's query tag."""
    for name, value in _unreachable_env(4443).items():
        monkeypatch.setenv(name, value)
    credentials = SnowflakeCredentials.from_settings(load_settings())
    assert credentials.to_connector_params(warehouse_snowflake.query_tag("run-1")) == {
        "account": "acme-test",
        "user": "TRANSFORMER",
        "warehouse": "TRANSFORMING",
        "database": "ANALYTICS",
        "schema": "ANALYTICS",
        "host": "127.0.0.1",
        "port": 4443,
        "protocol": "http",
        "login_timeout": 10.0,
        "network_timeout": 120,
        "application": "elt-appliance",
        "password": "p@ss:w/rd",
        "session_parameters": {"QUERY_TAG": '{"app":"elt-appliance","flow_run_id":"run-1"}'},
    }
