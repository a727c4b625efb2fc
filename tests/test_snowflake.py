"""Snowflake credentials: every accepted form of the private key, the password, and the errors.

Keys are real RSA keys generated here; the connection tests use fakesnow's server, which accepts
any credentials: they prove the connector takes what we build, not that Snowflake would
authenticate it (only a real account checks the key against the user's RSA_PUBLIC_KEY).
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from elt import dbt, snowflake
from elt.settings import load_settings
from tests.conftest import FakesnowServer


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
        assert snowflake.private_key_der(value, passphrase) == expected, form


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
    with pytest.raises(snowflake.SnowflakeKeyError) as error:
        snowflake.private_key_der(value, passphrase)
    assert message in str(error.value)
    if not value.startswith("/no/such"):
        assert value not in str(error.value)


def test_key_never_appears_in_an_error(key: rsa.RSAPrivateKey) -> None:
    """A body with a character missing (a bad paste) fails without echoing any of the key."""
    broken = _body(_pem(key))[:-7]
    with pytest.raises(snowflake.SnowflakeKeyError) as error:
        snowflake.private_key_der(broken)
    assert broken[:30] not in str(error.value) and broken[-30:] not in str(error.value)


def test_passphrase_problems_name_the_variables(key: rsa.RSAPrivateKey) -> None:
    encrypted = _pem(key, "right")
    with pytest.raises(snowflake.SnowflakeKeyError, match="is encrypted: set SNOWFLAKE_PRIVATE_KEY_PASSPHRASE"):
        snowflake.private_key_der(encrypted)
    with pytest.raises(snowflake.SnowflakeKeyError, match="could not be read with SNOWFLAKE_PRIVATE_KEY_PASSPHRASE") as error:
        snowflake.private_key_der(encrypted, "wrong")
    assert "right" not in str(error.value) and _body(encrypted)[:40] not in str(error.value)
    with pytest.raises(snowflake.SnowflakeKeyError, match="key is not encrypted; unset it"):
        snowflake.private_key_der(_pem(key), "unneeded")


def test_key_pair_profile_gives_dbt_base64_der_through_the_environment(
    key: rsa.RSAPrivateKey, snowflake_env: FakesnowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SNOWFLAKE_PASSWORD")
    monkeypatch.setenv("SNOWFLAKE_PRIVATE_KEY", _pem(key, "pp"))
    monkeypatch.setenv("SNOWFLAKE_PRIVATE_KEY_PASSPHRASE", "pp")
    settings = load_settings()
    rendered = dbt.render_profile(settings, "any_profile")
    output = yaml.safe_load(rendered)["any_profile"]["outputs"]["snowflake"]
    assert output["private_key"] == "{{ env_var('ELT_SNOWFLAKE_PRIVATE_KEY_DER_BASE64') }}"
    assert "password" not in output and "private_key_passphrase" not in output
    assert _body(_pem(key))[:40] not in rendered
    assert base64.b64decode(dbt.dbt_environment(settings)[snowflake.DBT_KEY_VARIABLE]) == _der(key)
    assert snowflake.connect_kwargs(settings)["private_key"] == _der(key)


def test_connector_connects_with_the_settings(snowflake_env: FakesnowServer) -> None:
    with snowflake.connect(load_settings(), snowflake.query_tag("run-1")) as connection:
        assert connection.cursor().execute("select 41 + 1").fetchone() == (42,)


def test_missing_settings_are_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELT_WAREHOUSE", "snowflake")
    monkeypatch.setenv("SNOWFLAKE_ACCOUNT", "acme")
    with pytest.raises(Exception, match="needs SNOWFLAKE_USER, SNOWFLAKE_WAREHOUSE, SNOWFLAKE_DATABASE, SNOWFLAKE_PRIVATE_KEY or SNOWFLAKE_PASSWORD"):
        snowflake.connect_kwargs(load_settings())
