"""The config package: defaults, TOML file, environment overlay and one-line errors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import config.loader
from config import (
    DEFAULT_CONFIG_FILE,
    BrokerSettings,
    ConfigError,
    DatabaseSettings,
    Settings,
    load_settings,
)
from tests.helpers import run_mqttprov


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty directory, with no system file, so that no stray configuration is picked up."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config.loader, "SYSTEM_CONFIG_FILE", tmp_path / "etc" / "mqttprov.toml")


def write_toml(tmp_path: Path, text: str, name: str = "custom.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None) -> str:
    """The message of the ConfigError that loading ``path`` raises."""
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


# -- defaults and sources -------------------------------------------------------------------------


def test_defaults_without_file_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MQTTPROV_API__ENABLED")  # set for every test by conftest
    settings = load_settings()

    assert settings == Settings()
    assert settings.broker.host == "0.0.0.0"
    assert settings.broker.port == 1883
    assert settings.broker.advertised_host is None
    assert settings.broker.tls_port is None
    assert settings.broker.ws_port is None
    assert settings.database.url == "sqlite+aiosqlite:///mqttprov.db"
    assert settings.database.pool_size == 5
    assert settings.auth.bcrypt_cost == 12


def test_explicit_file_is_loaded(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[broker]\nhost = "10.0.0.5"\nport = 1884\n\n[auth]\nbcrypt_cost = 4\n\n'
        '[database]\nurl = "postgresql+asyncpg://u@db/mqttprov"\n',
    )

    settings = load_settings(path)

    assert settings.broker.host == "10.0.0.5"
    assert settings.broker.port == 1884
    assert settings.auth.bcrypt_cost == 4
    assert settings.database.url == "postgresql+asyncpg://u@db/mqttprov"
    # Keys the file leaves out keep their defaults.
    assert settings.database.pool_size == 5


def test_default_file_in_working_directory_is_picked_up(tmp_path: Path) -> None:
    write_toml(tmp_path, "[broker]\nport = 2883\n", name=str(DEFAULT_CONFIG_FILE))

    assert load_settings().broker.port == 2883


def test_explicit_file_wins_over_default_file(tmp_path: Path) -> None:
    write_toml(tmp_path, "[broker]\nport = 2883\n", name=str(DEFAULT_CONFIG_FILE))
    explicit = write_toml(tmp_path, "[broker]\nport = 3883\n")

    assert load_settings(explicit).broker.port == 3883


def test_config_variable_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml(tmp_path, "[broker]\nport = 2883\n", name=str(DEFAULT_CONFIG_FILE))
    named = write_toml(tmp_path, "[broker]\nport = 3883\n")
    monkeypatch.setenv("MQTTPROV_CONFIG", str(named))

    assert load_settings().broker.port == 3883


def test_explicit_file_wins_over_config_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTTPROV_CONFIG", str(write_toml(tmp_path, "[broker]\nport = 3883\n")))
    explicit = write_toml(tmp_path, "[broker]\nport = 4883\n", name="explicit.toml")

    assert load_settings(explicit).broker.port == 4883


def test_config_variable_naming_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTTPROV_CONFIG", str(tmp_path / "absent.toml"))
    # The file it names must exist: no quiet fall-back to ./mqttprov.toml.
    write_toml(tmp_path, "[broker]\nport = 2883\n", name=str(DEFAULT_CONFIG_FILE))

    assert config_error(None) == f"config error: MQTTPROV_CONFIG={tmp_path / 'absent.toml'}: no such file"


def test_system_file_is_the_last_resort(tmp_path: Path) -> None:
    system = config.loader.SYSTEM_CONFIG_FILE
    system.parent.mkdir()
    system.write_text("[broker]\nport = 5883\n", encoding="utf-8")

    assert load_settings().broker.port == 5883
    write_toml(tmp_path, "[broker]\nport = 2883\n", name=str(DEFAULT_CONFIG_FILE))
    assert load_settings().broker.port == 2883


def test_env_overlay_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(tmp_path, '[broker]\nhost = "10.0.0.5"\nport = 1884\n')
    monkeypatch.setenv("MQTTPROV_BROKER__PORT", "1999")

    settings = load_settings(path)

    assert settings.broker.port == 1999
    # The overlay is per key: the rest of the file's [broker] table survives.
    assert settings.broker.host == "10.0.0.5"


def test_env_overlay_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTTPROV_AUTH__BCRYPT_COST", "5")
    monkeypatch.setenv("MQTTPROV_BROKER__ADVERTISED_HOST", "mqtt.example.net")

    settings = load_settings()

    assert settings.auth.bcrypt_cost == 5
    assert settings.broker.advertised_host == "mqtt.example.net"


def test_loaded_settings_are_frozen() -> None:
    settings = load_settings()

    with pytest.raises(ValueError, match="frozen"):
        settings.broker.port = 1  # type: ignore[misc]


# -- errors: exactly one line each ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[broker]\nport = "abc"\n', "config error: broker.port: 'abc' is not an integer"),
        ("[broker]\nport = -1\n", "config error: broker.port: -1 is too small (allowed: >= 0)"),
        (
            "[broker]\nadvertised_port = 0\n",
            "config error: broker.advertised_port: 0 is too small (allowed: >= 1)",
        ),
        ("[broker]\nport = 65536\n", "config error: broker.port: 65536 is too large (allowed: <= 65535)"),
        ("[auth]\nbcrypt_cost = 99\n", "config error: auth.bcrypt_cost: 99 is too large (allowed: <= 15)"),
        ("[auth]\nbcrypt_cost = 3\n", "config error: auth.bcrypt_cost: 3 is too small (allowed: >= 4)"),
        ("[broker]\nfoo = 1\n", "config error: broker.foo: unknown key"),
        ("[nosuchsection]\nx = 1\n", "config error: nosuchsection: unknown key"),
        ("broker = 5\n", "config error: broker: must be a table, not 5"),
        ("[broker]\ntls_port = 8883\n", "config error: broker: tls_port needs both tls_cert and tls_key"),
        ('[broker]\ntls_cert = "cert.pem"\n', "config error: broker: tls_cert and tls_key go together"),
        (
            '[database]\nurl = "mysql://root@localhost/mqttprov"\n',
            (
                "config error: database: url must start with sqlite+aiosqlite:// or "
                "postgresql+asyncpg:// (async drivers only)"
            ),
        ),
    ],
    ids=[
        "port-not-int",
        "port-negative",
        "advertised-port-zero",
        "port-too-large",
        "cost-too-large",
        "cost-too-small",
        "unknown-key",
        "unknown-section",
        "section-not-table",
        "tls-port-without-cert",
        "cert-without-key",
        "unsupported-database",
    ],
)
def test_bad_file_value_is_one_line(tmp_path: Path, toml: str, message: str) -> None:
    assert config_error(write_toml(tmp_path, toml)) == message


def test_tls_port_with_cert_and_key_is_accepted(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[broker]\ntls_port = 8883\ntls_cert = "c.pem"\ntls_key = "k.pem"\n')

    broker = load_settings(path).broker

    assert broker.tls_port == 8883
    assert broker.tls_cert == Path("c.pem")
    assert broker.tls_key == Path("k.pem")


def test_invalid_toml_names_file_and_parser_reason(tmp_path: Path) -> None:
    text = "[broker\nport = 1\n"
    path = write_toml(tmp_path, text)
    with pytest.raises(tomllib.TOMLDecodeError) as parser:
        tomllib.loads(text)

    assert config_error(path) == f"config error: {path}: invalid TOML: {parser.value}"


def test_missing_explicit_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    assert config_error(path) == f"config error: {path}: no such file"


def test_env_bad_value_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTTPROV_BROKER__PORT", "abc")

    assert config_error(None) == "config error: broker.port: 'abc' is not an integer"


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        ("MQTTPROV_BROKR__PORT", "no such setting (did you mean MQTTPROV_BROKER__PORT?)"),
        ("MQTTPROV_BROKER_PORT", "no such setting (did you mean MQTTPROV_BROKER__PORT?)"),
        ("MQTTPROV_DATABASE__URI", "no such setting (did you mean MQTTPROV_DATABASE__URL?)"),
        ("mqttprov_auth_bcrypt_cost", "no such setting (did you mean MQTTPROV_AUTH__BCRYPT_COST?)"),
        ("MQTTPROV_BROKER__NOPE", "no such setting (settings are MQTTPROV_<SECTION>__<KEY>)"),
        ("MQTTPROV_PORT", "no such setting (settings are MQTTPROV_<SECTION>__<KEY>)"),
    ],
)
def test_env_variable_that_names_no_setting_is_an_error(
    monkeypatch: pytest.MonkeyPatch, variable: str, message: str
) -> None:
    monkeypatch.setenv(variable, "1884")

    assert config_error(None) == f"config error: {variable}: {message}"


def test_env_variables_that_are_not_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTTPROV_TEST_POSTGRES_URL", "postgresql+asyncpg://nobody@nowhere/test")
    monkeypatch.setenv("MQTTPROV_TEST_ANYTHING", "1")
    monkeypatch.setenv("mqttprov_broker__port", "1999")  # read case-insensitively, like the file's keys

    assert load_settings().broker.port == 1999


def test_every_setting_has_its_variable() -> None:
    variables = config.loader.setting_variables()

    assert "MQTTPROV_BROKER__PORT" in variables
    assert "MQTTPROV_AUTHD__KICK_COMMAND" in variables
    assert len(variables) == sum(len(type(section).model_fields) for _, section in Settings())


def test_bad_default_file_is_reported(tmp_path: Path) -> None:
    write_toml(tmp_path, "[auth]\nbcrypt_cost = 3\n", name=str(DEFAULT_CONFIG_FILE))

    assert config_error(None) == "config error: auth.bcrypt_cost: 3 is too small (allowed: >= 4)"


# -- warnings and derived values ------------------------------------------------------------------


def host_warnings(settings: Settings) -> list[str]:
    """The warnings about the broker's advertised address (other sections warn too)."""
    return [w for w in settings.warnings() if w.startswith("broker.host")]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "*", "0:0::0"])
def test_wildcard_host_without_advertised_host_warns(host: str) -> None:
    [warning] = host_warnings(Settings(broker=BrokerSettings(host=host)))

    assert "broker.advertised_host" in warning
    assert repr(host) in warning


def test_default_settings_warn_about_host() -> None:
    assert len(host_warnings(Settings())) == 1


@pytest.mark.parametrize(
    "broker",
    [
        BrokerSettings(host="0.0.0.0", advertised_host="mqtt.example.net"),
        BrokerSettings(host="192.0.2.10"),
        BrokerSettings(host="::1"),
        BrokerSettings(host="mqtt.example.net"),
    ],
    ids=["wildcard-advertised", "ipv4", "ipv6", "hostname"],
)
def test_dialable_host_does_not_warn(broker: BrokerSettings) -> None:
    assert host_warnings(Settings(broker=broker)) == []


def test_effective_advertised_defaults_to_listener() -> None:
    broker = BrokerSettings(host="192.0.2.10", port=1884)

    assert broker.effective_advertised_host == "192.0.2.10"
    assert broker.effective_advertised_port == 1884


def test_effective_advertised_prefers_advertised_values() -> None:
    broker = BrokerSettings(
        host="0.0.0.0", port=1884, advertised_host="mqtt.example.net", advertised_port=443
    )

    assert broker.effective_advertised_host == "mqtt.example.net"
    assert broker.effective_advertised_port == 443


def test_database_settings_accept_both_async_drivers() -> None:
    assert DatabaseSettings(url="sqlite+aiosqlite:///x.db").url == "sqlite+aiosqlite:///x.db"
    assert DatabaseSettings(url="postgresql+asyncpg://u@h/db").url == "postgresql+asyncpg://u@h/db"


@pytest.mark.parametrize(
    "template",
    ["devices/{device_id}", "devices/+/{device_id}/#", "fleet/{mac}/#/x", "static/#", "{nope}/#"],
)
def test_device_template_must_be_a_per_device_prefix(tmp_path: Path, template: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[acl]\ndevice_template = "{template}"\n')
    with pytest.raises(ConfigError, match=r"^config error: acl\.device_template: "):
        load_settings(path)


def test_device_template_accepts_a_prefix_with_placeholders(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[acl]\ndevice_template = "fleet/{mac}/{device_id}/#"\n')
    assert load_settings(path).acl.device_template == "fleet/{mac}/{device_id}/#"


# -- through the CLI --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variable", ["MQTTPROV_BROKR__PORT", "MQTTPROV_BROKER_PORT"])
def test_cli_misspelled_variable_is_one_line_and_exit_2(tmp_path: Path, variable: str) -> None:
    done = run_mqttprov("config", "show", cwd=tmp_path, env={variable: "1884"})

    assert done.returncode == 2
    assert done.stderr == f"config error: {variable}: no such setting (did you mean MQTTPROV_BROKER__PORT?)\n"
    assert done.stdout == ""


def test_cli_reads_the_file_mqttprov_config_names(tmp_path: Path) -> None:
    named = write_toml(tmp_path, "[broker]\nport = 3883\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    done = run_mqttprov("config", "show", "--json", cwd=elsewhere, env={"MQTTPROV_CONFIG": str(named)})

    assert done.returncode == 0, done.stderr
    assert '"port": 3883' in done.stdout


def test_ci_exports_no_variable_the_settings_refuse() -> None:
    # Every mqttprov process a test starts inherits .ci/run's environment: a variable of ours that
    # names no setting stops each of them with a config error (MQTTPROV_REQUIRE_BROWSER did).
    run = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    exported = re.findall(r"export (MQTTPROV_\w+)=", run)
    assert exported  # the browser tests' switch, at least
    config.loader.check_environment(dict.fromkeys(exported, "1"))  # raises ConfigError otherwise
