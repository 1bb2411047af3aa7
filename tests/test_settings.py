"""Layered settings: flag > environment variable > TOML file > default, for both entry points."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from splitwire.cloud import cli as cloud_cli
from splitwire.cloud.config import ComputeMode, ServerConfig, default_torch_threads
from splitwire.edge import cli as edge_cli
from splitwire.split.settings import Option, OptionSet, SettingsError

OPTIONS = OptionSet(
    "APP",
    "server",
    (
        Option("--max-queue", int, 256, "queue"),
        Option("--delay-ms", float, 2.0, "delay"),
        Option("--name", str, None, "name"),
        Option("--cert", Path, None, "cert"),
    ),
)


def resolve(argv: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    OPTIONS.add_to(parser)
    return OPTIONS.resolve(parser.parse_args(argv), environ=env or {})


def test_defaults_when_nothing_is_set() -> None:
    assert resolve([]) == {"max_queue": 256, "delay_ms": 2.0, "name": None, "cert": None}


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('max_queue = 10\ndelay_ms = 5\nname = "from-file"\n[server]\ncert = "/etc/c.pem"\n')
    env = {"APP_MAX_QUEUE": "20", "APP_DELAY_MS": "7.5"}
    values = resolve(["--config", str(config), "--max-queue", "30"], env)
    assert values == {"max_queue": 30, "delay_ms": 7.5, "name": "from-file", "cert": Path("/etc/c.pem")}
    assert resolve(["--config", str(config)], env)["max_queue"] == 20
    assert resolve(["--config", str(config)])["max_queue"] == 10
    assert resolve([], {"APP_CONFIG": str(config)})["delay_ms"] == 5.0


def test_a_flag_given_its_default_value_still_wins() -> None:
    assert resolve(["--max-queue", "256"], {"APP_MAX_QUEUE": "1"})["max_queue"] == 256


def test_other_tables_are_left_to_other_programs(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[edge]\nserver = "x:1"\n[server]\nmax_queue = 3\n')
    assert resolve(["--config", str(config)])["max_queue"] == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_que = 3\n", "unknown setting(s) max_que; known: cert, delay_ms, max_queue, name"),
        ('max_queue = "many"\n', "c.toml: max_queue='many' is not a valid value for --max-queue"),
        ("max_queue = 2.5\n", "is not a valid value for --max-queue"),
        ("max_queue = true\n", "--max-queue takes a single int value"),
        ("max_queue = [1]\n", "--max-queue takes a single int value"),
        ("max_queue = 1\n[server]\nmax_queue = 2\n", "max_queue is set both at the top level and under [server]"),
        ("max_queue = \n", "is not valid TOML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(SettingsError) as caught:
        resolve(["--config", str(config)])
    assert message in str(caught.value)


def test_bad_environment_values_name_the_variable() -> None:
    with pytest.raises(SettingsError, match="environment variable APP_MAX_QUEUE='lots' is not a valid value"):
        resolve([], {"APP_MAX_QUEUE": "lots"})


def test_missing_config_file_says_which(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist; fix --config or APP_CONFIG"):
        resolve(["--config", str(tmp_path / "absent.toml")])


def test_empty_environment_values_count_as_unset() -> None:
    assert resolve([], {"APP_MAX_QUEUE": ""})["max_queue"] == 256


def cloud_config(argv: list[str], env: dict[str, str] | None = None) -> ServerConfig:
    args = cloud_cli.build_parser().parse_args(["serve", *argv])
    return cloud_cli.config_from_values(cloud_cli.SERVE_OPTIONS.resolve(args, environ=env or {}))


def test_cloud_defaults_are_the_server_config_defaults() -> None:
    assert cloud_config([]) == ServerConfig(torch_threads=default_torch_threads())


def test_cloud_config_from_all_three_sources(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(
        "[server]\nmax_batch_size = 8\nmax_queue = 64\nmax_queue_delay_ms = 5\nmax_sessions = 3\n"
        'tls_cert = "/srv/cert.pem"\ntls_key = "/srv/key.pem"\nmetrics_port = -1\n'
    )
    built = cloud_config(
        ["--config", str(config), "--max-queue", "16"],
        {"SPLITWIRE_CLOUD_MAX_BATCH_SIZE": "4", "SPLITWIRE_CLOUD_AUTH_TOKEN_FILE": "/srv/token"},
    )
    assert (built.max_queue, built.max_batch_size, built.max_queue_delay_ms, built.max_sessions) == (16, 4, 5.0, 3)
    assert (built.tls_cert, built.tls_key, built.auth_token_file) == (
        Path("/srv/cert.pem"),
        Path("/srv/key.pem"),
        Path("/srv/token"),
    )
    assert built.metrics_port is None
    assert cloud_config(["--compute", "thread"]).compute is ComputeMode.THREAD
    with pytest.raises(SystemExit):
        cloud_config(["--compute", "gpu"])


def test_cloud_refuses_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="max_queue must be at least 1"):
        cloud_config(["--max-queue", "0"])
    with pytest.raises(ValueError, match="--tls-client-ca"):
        cloud_config(["--tls-client-ca", "/ca.pem"])


def test_cloud_help_documents_every_contract_flag_with_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cloud_cli.build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--config",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--auth-token-file",
        "--max-batch-size",
        "--max-queue-delay-ms",
        "--max-queue",
        "--max-message-bytes",
        "--max-sessions",
        "--max-tokens",
    ):
        assert flag in text
        assert "SPLITWIRE_CLOUD_" + flag.removeprefix("--").replace("-", "_").upper() in text


def test_edge_connection_settings(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('[edge]\nserver = "cloud:443"\ntls_ca = "/ca.pem"\ntimeout = 3\n')
    args = edge_cli.build_parser().parse_args(["run", "--config", str(config), "--auth-token-file", "/tok", "hi"])
    values = edge_cli.CONNECTION_OPTIONS.resolve(args, environ={"SPLITWIRE_EDGE_CODEC": "int8-zstd"})
    built = edge_cli.config_from_values(values)
    assert (built.server, built.codec, built.timeout_s) == ("cloud:443", "int8-zstd", 3.0)
    assert built.security.tls_ca == Path("/ca.pem") and built.security.auth_token_file == Path("/tok")
    assert built.security.tls
