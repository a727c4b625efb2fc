"""The appliance's configuration: one typed object read from the environment and `.env`.

Every setting has an `ELT_` variable; Snowflake's use the `SNOWFLAKE_` names that dbt
profiles conventionally read. Relative paths are resolved against `ELT_HOME` (the
directory `elt` runs from unless set), so the same `.env` works on a laptop, in CI and
inside the worker container.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from elt.errors import ConfigurationError


class Warehouse(str, Enum):
    duckdb = "duckdb"
    snowflake = "snowflake"


class AirbyteBackend(str, Enum):
    embedded = "embedded"
    server = "server"


class DbtStart(str, Enum):
    with_syncs = "with-syncs"
    after_syncs = "after-syncs"


class SmtpTls(str, Enum):
    starttls = "starttls"
    ssl = "ssl"
    none = "none"


class AlertWarnings(str, Enum):
    each = "each"
    daily = "daily"
    off = "off"


def _snowflake(name: str) -> AliasChoices:
    return AliasChoices(f"SNOWFLAKE_{name}", f"ELT_SNOWFLAKE_{name}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ELT_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    home: Path = Field(
        default_factory=Path.cwd,
        description="Directory that relative paths below are resolved against.",
    )
    env: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        description="Environment (staging, prod...): environments/<env>.env overlays .env, and the environment gets "
        "its own data folder and DuckDB file unless its file names them (`elt run --env`).",
    )
    data_dir: Path = Field(Path("data"), description="Where the DuckDB warehouse, checkouts and run state live.")
    warehouse: Warehouse = Field(Warehouse.duckdb, description="Warehouse that Airbyte loads into and dbt builds in.")
    duckdb_path: Path = Field(Path("data/warehouse.duckdb"), description="DuckDB database file of the embedded warehouse.")

    airbyte_backend: AirbyteBackend = Field(
        AirbyteBackend.embedded,
        description="'embedded' runs connectors in-process with PyAirbyte; 'server' drives an Airbyte server.",
    )
    airbyte_connections_file: Path = Field(
        Path("airbyte/connections.yaml"),
        description="Embedded connections as code: source connector, config, streams, destination schema.",
    )
    connectors_dir: Path = Field(
        Path(".venv-connectors"),
        description="One virtualenv per embedded connector, installed on first use from its 'pip' spec.",
    )
    airbyte_catalog_max_age_hours: float = Field(
        24.0,
        ge=0,
        description="How long an embedded connection's discovered catalog (its streams and columns) is reused before "
        "discover runs again; 0 discovers on every sync. A changed config or connector version always rediscovers.",
    )
    extract_concurrency: int = Field(10, ge=1, description="How many connections sync at once.")
    sync_attempts: int = Field(
        1,
        ge=1,
        description="Attempts per connection sync that fails with a transient error (network, a busy or restarting "
        "server); a terminal error (bad config, a failed connector) fails at once. 1: no retry.",
    )
    sync_retry_delay_seconds: float = Field(30.0, ge=0, description="Wait before a sync's next attempt.")

    airbyte_url: str = Field(
        "http://localhost:8000",
        description="Airbyte server (ELT_AIRBYTE_BACKEND=server); its public API is served under /api/public/v1.",
    )
    airbyte_client_id: str | None = Field(
        None, description="Application client id (`abctl local credentials`). Unset: Airbyte runs with --disable-auth."
    )
    airbyte_client_secret: SecretStr | None = Field(None, description="Application client secret.")
    airbyte_workspace_id: str | None = Field(None, description="Only sync connections of this workspace.")
    airbyte_connection_tag: str | None = Field(
        None, description="Only sync connections carrying this tag (when no names are given)."
    )
    airbyte_poll_seconds: float = Field(5.0, gt=0, description="How often each running job is polled.")
    airbyte_sync_timeout_seconds: float = Field(
        6 * 3600, gt=0, description="A sync running longer is cancelled in Airbyte and fails."
    )
    airbyte_request_attempts: int = Field(
        6, ge=1, description="Attempts per API call on connection errors, 5xx and 429 (exponential backoff)."
    )
    airbyte_request_timeout_seconds: float = Field(30.0, gt=0, description="Timeout of one API request.")

    git_repo: str | None = Field(
        None,
        description="The repo holding the dbt project: a URL (no credentials in it) or local path. Unset: the repo ELT_HOME is in, pulled in place.",
    )
    git_branch: str | None = Field(
        None, description="Branch to deploy. Unset: the checkout's current branch (or the remote's default on first clone)."
    )
    git_checkout_dir: Path | None = Field(
        None, description="Where a remote ELT_GIT_REPO is cloned. Unset: data/repos/<repo name>-<hash of its URL>."
    )
    git_token: SecretStr | None = Field(
        None, description="HTTPS token for a private repo (sent through GIT_ASKPASS, never in a URL)."
    )
    git_username: str | None = Field(
        None, description="User name sent with ELT_GIT_TOKEN. Unset: x-access-token (what GitHub and GitLab accept)."
    )
    git_ssh_key_path: Path | None = Field(None, description="Deploy key for an SSH repo URL.")

    dbt_project_dir: Path = Field(Path("dbt"), description="Folder of the dbt project inside the repo.")
    dbt_target: str | None = Field(None, description="dbt target to build. Unset: the warehouse's name (duckdb or snowflake).")
    dbt_use_project_profiles: bool = Field(
        False,
        description="Use the repo's own profiles.yml instead of the profile the appliance renders from these settings.",
    )
    dbt_threads: int = Field(4, ge=1, description="dbt threads.")
    dbt_schema: str = Field("main", description="Base schema dbt builds into; marts go to <schema>_marts.")
    dbt_start: DbtStart = Field(
        DbtStart.with_syncs,
        description="When dbt's process starts beside embedded syncs: 'with-syncs' (its import overlaps them) or "
        "'after-syncs' (a peak ~85 MB lower, ~150 MB of summed RSS, for 0.3-3 s more: docs/benchmarks.md, P3). "
        "With an Airbyte server: with them.",
    )

    snowflake_account: str | None = Field(
        None,
        validation_alias=_snowflake("ACCOUNT"),
        description="Account identifier, e.g. myorg-myaccount (the part before .snowflakecomputing.com).",
    )
    snowflake_user: str | None = Field(None, validation_alias=_snowflake("USER"), description="The user runs log in as.")
    snowflake_password: SecretStr | None = Field(
        None, validation_alias=_snowflake("PASSWORD"), description="Password auth; unset when SNOWFLAKE_PRIVATE_KEY is set."
    )
    snowflake_role: str | None = Field(
        None, validation_alias=_snowflake("ROLE"), description="Role runs use; unset: the user's default role."
    )
    snowflake_warehouse: str | None = Field(
        None, validation_alias=_snowflake("WAREHOUSE"), description="Virtual warehouse that runs the queries (and is billed)."
    )
    snowflake_database: str | None = Field(
        None, validation_alias=_snowflake("DATABASE"), description="Database raw data lands in and dbt builds into."
    )
    snowflake_schema: str = Field(
        "ANALYTICS", validation_alias=_snowflake("SCHEMA"), description="Base schema dbt builds into on Snowflake."
    )
    snowflake_private_key: SecretStr | None = Field(
        None,
        validation_alias=_snowflake("PRIVATE_KEY"),
        description="Key-pair auth: a PEM, its base64 body without newlines, or a path to the key file.",
    )
    snowflake_private_key_passphrase: SecretStr | None = Field(
        None,
        validation_alias=_snowflake("PRIVATE_KEY_PASSPHRASE"),
        description="Passphrase of an encrypted SNOWFLAKE_PRIVATE_KEY.",
    )
    snowflake_host: str | None = Field(
        None, validation_alias=_snowflake("HOST"), description="Only for private link or a test server."
    )
    snowflake_port: int | None = Field(
        None, validation_alias=_snowflake("PORT"), description="Only with SNOWFLAKE_HOST: its port."
    )
    snowflake_protocol: str | None = Field(
        None, validation_alias=_snowflake("PROTOCOL"), description="Only with SNOWFLAKE_HOST: http or https."
    )
    snowflake_connect_timeout_seconds: float = Field(
        10,
        gt=0,
        validation_alias=_snowflake("CONNECT_TIMEOUT_SECONDS"),
        description="How long one login to Snowflake may take, retries included, before it fails naming the account and host.",
    )

    docs_dir: Path = Field(
        Path("/var/lib/elt/dbt-docs"),
        description="The dbt-docs service's folder: site/ (served) and target/ (dbt's target path).",
    )
    docs_port: int = Field(8080, ge=1, le=65535, description="Port the dbt-docs service listens on inside its container.")
    docs_poll_seconds: float = Field(
        30.0, gt=0, description="How often the dbt-docs service asks Prefect for a newer completed all-etl run."
    )
    zombie_seconds: int = Field(
        300,
        ge=1,
        description="The crash-zombie-flow-runs automation marks a flow run Crashed after this long without a heartbeat.",
    )
    min_free_gb: float = Field(
        5.0,
        ge=0,
        description="`elt doctor` fails when the data folder's disk has less free space than this, in GB.",
    )

    slack_webhook_url: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("SLACK_WEBHOOK_URL", "ELT_SLACK_WEBHOOK_URL"),
        description="Slack incoming webhook the alerts are posted to. Unset: no Slack alerts.",
    )
    alert_smtp_host: str | None = Field(None, description="SMTP server that email alerts are sent through. Unset: no email.")
    alert_smtp_port: int = Field(587, ge=1, le=65535, description="Port of ELT_ALERT_SMTP_HOST.")
    alert_smtp_tls: SmtpTls = Field(
        SmtpTls.starttls, description="'starttls' (port 587), 'ssl' (implicit TLS, port 465) or 'none' (plain SMTP)."
    )
    alert_smtp_user: str | None = Field(None, description="SMTP login. Unset: no login.")
    alert_smtp_password: SecretStr | None = Field(None, description="Password of ELT_ALERT_SMTP_USER.")
    alert_email_from: str | None = Field(None, description="Sender address of email alerts.")
    alert_email_to: str | None = Field(None, description="Recipients of email alerts, comma-separated.")
    alert_webhook_url: SecretStr | None = Field(
        None,
        description="Any endpoint that takes a JSON POST (Teams, Discord, PagerDuty, your own); a secret, as such URLs "
        "often carry a token. Unset: no webhook alerts.",
    )
    alert_webhook_header: str | None = Field(
        None, description="Name of a header that carries ELT_ALERT_WEBHOOK_SECRET with each webhook POST."
    )
    alert_webhook_secret: SecretStr | None = Field(None, description="Value of the ELT_ALERT_WEBHOOK_HEADER header.")
    alert_warnings: AlertWarnings = Field(
        AlertWarnings.each,
        description="dbt nodes that end in 'warn' (test warnings, stale sources): 'each' sends a message per node, "
        "'daily' at most one a day (the first; the rest are in the Prefect UI), 'off' none.",
    )
    alert_running_seconds: int = Field(
        7200,
        ge=10,  # Prefect's least `within` for a proactive trigger
        description="An all-etl run still Running after this long gets an alert (a stuck sync, a hung query).",
    )

    @field_validator("git_repo")
    @classmethod
    def _no_credentials_in_repo_url(cls, value: str | None) -> str | None:
        from elt.git_repo import credentials_problem

        problem = credentials_problem(value) if value else None
        if problem:
            raise ValueError(problem)
        return value

    def path(self, value: Path) -> Path:
        """Resolve a configured path against ELT_HOME."""
        value = value.expanduser()
        return value if value.is_absolute() else (self.home / value).resolve()

    @property
    def airbyte_api_url(self) -> str:
        url = self.airbyte_url.rstrip("/")
        return url if url.endswith("/api/public/v1") else f"{url}/api/public/v1"

    @property
    def effective_dbt_target(self) -> str:
        return self.dbt_target or self.warehouse.value

    def environment(self) -> dict[str, str]:
        """The process environment over the `.env` file these settings read, which pydantic-settings
        does not export, and the environment's file over both: where the connections' `${VAR}`
        references are looked up."""
        from dotenv import dotenv_values

        env_file = self.model_config.get("env_file")
        values = dotenv_values(env_file) if isinstance(env_file, str) else {}
        overlay = _env_file_values(self.path(environment_file(self.env))) if self.env else {}
        return {**{key: value for key, value in values.items() if value is not None}, **os.environ, **overlay}


ENVIRONMENTS_FOLDER = Path("environments")


def environment_file(name: str) -> Path:
    return ENVIRONMENTS_FOLDER / f"{name}.env"


def environment_names(home: Path) -> list[str]:
    """The environments defined under `home` (environments/<name>.env), sorted."""
    folder = home / ENVIRONMENTS_FOLDER
    return sorted(path.stem for path in folder.glob("*.env")) if folder.is_dir() else []


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment and `.env` (and an environment's file, `env=` or
    ELT_ENV); bad values raise one ConfigurationError.

    >>> load_settings(warehouse="duckdb").warehouse
    <Warehouse.duckdb: 'duckdb'>
    """
    try:
        return _in_environment(Settings(**overrides), overrides)
    except ValidationError as exc:
        problems = [f"{variable}: {message}" for _, variable, message in _problems(exc)]
        raise ConfigurationError("invalid settings: " + "; ".join(problems)) from None


def _in_environment(base: Settings, overrides: dict[str, Any], defaulted: dict[str, Any] | None = None) -> Settings:
    """`base` with its environment's file (environments/<env>.env) over the process environment
    and `.env`; `overrides` (the run's own flags) over all; `defaulted` (the doctor's defaults for
    invalid variables) under the file, so the file is not blamed for them. An environment never shares the
    default's data folder or DuckDB file: unless its file names them they are
    <data folder>/environments/<env> and <that folder>/warehouse.duckdb."""
    if not base.env:
        return base
    path = base.path(environment_file(base.env))
    if not path.is_file():
        defined = ", ".join(environment_names(base.home)) or "none"
        raise ConfigurationError(
            f"ELT_ENV={base.env}: {path} does not exist (environments defined: {defined}); create it or choose another"
        )
    fields = _fields_by_variable()
    values = _env_file_values(path)
    unknown = sorted(name for name in values if name.upper().startswith("ELT_") and name.upper() not in fields)
    if unknown:
        raise ConfigurationError(f"{path}: {', '.join(unknown)}: unknown setting(s) (every setting is listed in .env.example)")
    if "ELT_ENV" in {name.upper() for name in values} or "ELT_HOME" in {name.upper() for name in values}:
        raise ConfigurationError(f"{path}: ELT_ENV and ELT_HOME cannot be set by an environment's own file")
    overlay: dict[str, Any] = {fields[name.upper()]: value for name, value in values.items() if name.upper() in fields}
    overlay.setdefault("data_dir", base.data_dir / "environments" / base.env)
    overlay.setdefault("duckdb_path", Path(overlay["data_dir"]) / "warehouse.duckdb")
    try:
        return Settings(**{**(defaulted or {}), **overlay, **overrides, "home": base.home, "env": base.env})
    except ValidationError as exc:
        problems = [f"{variable}: {message}" for _, variable, message in _problems(exc)]
        raise ConfigurationError(f"{path}: invalid settings: " + "; ".join(problems)) from None


def _env_file_values(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    return {name: value for name, value in dotenv_values(path).items() if value is not None}


def _fields_by_variable() -> dict[str, str]:
    """{variable name: field name} for every variable that sets a field."""
    fields: dict[str, str] = {}
    for name, info in Settings.model_fields.items():
        if isinstance(info.validation_alias, AliasChoices):
            fields.update({str(choice): name for choice in info.validation_alias.choices})
        else:
            fields[f"ELT_{name.upper()}"] = name
    return fields


def load_settings_or_defaults(env: str | None = None) -> tuple[Settings, dict[str, str]]:
    """Settings with every invalid value replaced by its default, and {field name: problem}.

    For `elt doctor`, which reports the invalid variables and still runs every other check. An
    environment whose file is unusable is one problem (field `env`); the checks then see the
    settings without it.
    """
    invalid: dict[str, str] = {}
    while True:  # each round defaults at least one more field, so it ends
        defaults = {name: Settings.model_fields[name].get_default(call_default_factory=True) for name in invalid}
        if env and "env" not in invalid:
            defaults["env"] = env
        try:
            base = Settings(**defaults)
        except ValidationError as exc:
            new = {field: f"{variable}: {message}" for field, variable, message in _problems(exc) if field not in invalid}
            if not new:
                raise  # a default itself is invalid: a bug in this module, not a setting
            invalid.update(new)
            continue
        try:
            return _in_environment(base, {}, {name: value for name, value in defaults.items() if name != "env"}), invalid
        except ConfigurationError as exc:
            return base.model_copy(update={"env": None}), {**invalid, "env": str(exc)}


def _problems(exc: ValidationError) -> list[tuple[str, str, str]]:
    """(field name, variable, message) per error; the message never carries the rejected value."""
    by_alias = {
        alias: name
        for name, info in Settings.model_fields.items()
        if isinstance(info.validation_alias, AliasChoices)
        for alias in info.validation_alias.choices
    }
    problems = []
    for error in exc.errors():
        location = str(error["loc"][0]) if error["loc"] else ""
        field = by_alias.get(location, location)
        variable = location if location in by_alias else f"ELT_{location.upper()}"
        problems.append((field, variable, error["msg"].removeprefix("Value error, ")))
    return problems


# ELT_ variables that are not settings of the appliance: the compose stack and setup.sh read them
# (docker/docker-compose.yml, docker/Dockerfile),
# or the appliance sets them for its own children (git's askpass helper, dbt's query tag).
NON_SETTING_VARIABLES = frozenset(
    {
        "ELT_UID",
        "ELT_GID",  # user the containers run as
        "ELT_IMAGE",
        "ELT_BASE_IMAGE",
        "ELT_CI_BASE_IMAGE",
        "ELT_POSTGRES_IMAGE",
        "ELT_COMPOSE_OVERRIDE",  # docker/compose.sh
        "ELT_AIRBYTE_URL_FROM_STACK",  # becomes the worker's ELT_AIRBYTE_URL
        "ELT_HEARTBEAT_SECONDS",  # the worker's PREFECT_FLOWS_HEARTBEAT_FREQUENCY
        "ELT_RETENTION_DAYS",
        "ELT_RETENTION_CHECK_SECONDS",
        "ELT_RETENTION_SECONDS",  # the server's database vacuum (docker/compose.sh)
        "ELT_GIT_ASKPASS_TOKEN",
        "ELT_GIT_ASKPASS_USERNAME",  # git_repo's askpass helper
        "ELT_SNOWFLAKE_QUERY_TAG",
        "ELT_SNOWFLAKE_PRIVATE_KEY_DER_BASE64",  # set for dbt (warehouse_snowflake.py)
    }
)


def setting_variables() -> set[str]:
    """Every variable name that sets a field of Settings (ELT_ names and their SNOWFLAKE_ aliases)."""
    return set(_fields_by_variable())
