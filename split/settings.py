"""Layered command-line settings, one implementation for every entry point.

Each option resolves to one value, the first of::

    --max-queue 64                     a flag on the command line
    SPLITWIRE_CLOUD_MAX_QUEUE=64       an environment variable: the prefix, then the key upper-cased
    max_queue = 64                     a TOML file named by --config (or PREFIX_CONFIG): keys are the
                                       flags' names with underscores, at the top level or under [table]
    256                                the option's default

An entry point lists its options once as :class:`Option` rows; :class:`OptionSet` adds them to an
argparse parser (with ``None`` defaults, so a flag that was not given can be told from one given its
default value) and later resolves them into a plain dict the entry point turns into its typed config.
"""

from __future__ import annotations

import argparse
import logging
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """A setting from the environment or a config file cannot be used; the message names its source."""


@dataclass(frozen=True)
class Option:
    """One setting: its flag, how to parse its text, its default and its help."""

    flag: str  # "--max-queue"
    parse: Callable[[str], object]  # text -> value, raising ValueError on bad text (int, float, str, Path)
    default: object
    help: str
    metavar: str | None = None

    @property
    def key(self) -> str:
        """The name in config files and in the resolved dict: ``--max-queue`` -> ``max_queue``."""
        return self.flag.removeprefix("--").replace("-", "_")


class OptionSet:
    """The options of one entry point, with their environment prefix and config-file table."""

    def __init__(self, env_prefix: str, table: str, options: Sequence[Option]) -> None:
        keys = [option.key for option in options]
        if len(set(keys)) != len(keys) or "config" in keys:
            raise ValueError(f"option keys must be unique and not 'config': {keys}")
        self.env_prefix = env_prefix
        self.table = table
        self.options = tuple(options)

    def env_name(self, key: str) -> str:
        return f"{self.env_prefix}_{key.upper()}"

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add ``--config`` and every option to ``parser``; the help of each names its variable and default."""
        sample = next((o for o in self.options if "_" in o.key), self.options[0])
        example = f"{sample.key} = ... for {sample.flag}"
        parser.add_argument(
            "--config",
            type=Path,
            default=None,
            metavar="FILE",
            help=f"TOML file setting any option below by its name with underscores ({example}), at the top "
            f"level or under [{self.table}]; flags and environment variables override it "
            f"[env: {self.env_name('config')}]",
        )
        for option in self.options:
            parser.add_argument(
                option.flag,
                dest=option.key,
                type=option.parse,
                default=None,
                metavar=option.metavar,
                help=self._help(option),
            )

    def resolve(self, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, object]:
        """Every option's value by precedence flag > environment > config file > default."""
        environ = os.environ if environ is None else environ
        config = args.config or environ.get(self.env_name("config")) or None
        from_file = self.read_file(Path(config)) if config else {}
        values: dict[str, object] = {}
        for option in self.options:
            given = getattr(args, option.key, None)
            env_name = self.env_name(option.key)
            if given is not None:
                values[option.key] = given
            elif environ.get(env_name, "") != "":
                values[option.key] = _convert(option, environ[env_name], f"environment variable {env_name}")
            elif option.key in from_file:
                values[option.key] = from_file[option.key]
            else:
                values[option.key] = option.default
        return values

    def read_file(self, path: Path) -> dict[str, object]:
        """The options a TOML file sets, parsed; unknown keys are an error (a typo must not pass silently)."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(
                f"config file {path} does not exist; fix --config or {self.env_name('config')}"
            ) from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
        entries = {key: value for key, value in data.items() if not isinstance(value, dict)}
        table = data.get(self.table, {})
        if not isinstance(table, dict):
            raise SettingsError(f"{path}: {self.table} must be a table ([{self.table}])")
        for key, value in table.items():
            if key in entries:
                raise SettingsError(f"{path}: {key} is set both at the top level and under [{self.table}]")
            entries[key] = value
        other_tables = sorted(key for key, value in data.items() if isinstance(value, dict) and key != self.table)
        if other_tables:
            log.debug("%s: ignoring tables %s (this program reads [%s])", path, other_tables, self.table)
        by_key = {option.key: option for option in self.options}
        unknown = sorted(set(entries) - set(by_key))
        if unknown:
            raise SettingsError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(by_key))}")
        return {key: _convert_toml(by_key[key], value, f"{path}: {key}") for key, value in entries.items()}

    def _help(self, option: Option) -> str:
        default = "none" if option.default is None else str(option.default)
        text = f"{option.help} [env: {self.env_name(option.key)}; default: {default}]"
        return text.replace("%", "%%")  # argparse %-formats help strings


def _convert(option: Option, text: str, source: str) -> object:
    try:
        return option.parse(text)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{source}={text!r} is not a valid value for {option.flag}: {exc}") from None


def _convert_toml(option: Option, value: object, source: str) -> object:
    if isinstance(value, bool | dict | list):
        raise SettingsError(f"{source} = {value!r}: {option.flag} takes a single {_type_name(option)} value")
    return _convert(option, str(value), source)


def _type_name(option: Option) -> str:
    return getattr(option.parse, "__name__", "text")
