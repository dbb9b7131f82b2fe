"""A worker daemon's settings: defaults, a TOML file, the environment, the command line.

    [worker]
    id = "bob"
    broker = "amqp://guest:guest@localhost:5672/"
    prefetch = 64          # commands delivered ahead of the one being executed
    heartbeat = 30         # seconds; the connection stays alive during long commands
    reply_timeout = 60.0   # seconds to wait for another worker down a chain
    chunk_size = 8388608   # bytes; larger messages travel as chunks of this size
    log_level = "INFO"

Later sources win: file < `TORCHRELAY_BROKER` < command-line flags.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchrelay.broker import BROKER_ENV, DEFAULT_CHUNK_SIZE

__all__ = ["ConfigError", "WorkerConfig"]

_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A setting that is missing or wrong; the message names it."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    id: str
    broker: str
    prefetch: int = 64
    heartbeat: int | None = 30
    reply_timeout: float = 60.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not _WORKER_ID.match(self.id):
            raise ConfigError(
                f"worker id {self.id!r} must be 1-128 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        if not self.broker.startswith(("amqp://", "amqps://")):
            raise ConfigError(f"broker must be an amqp:// or amqps:// URL, not {self.broker!r}")
        if self.prefetch < 1:
            raise ConfigError(f"prefetch must be at least 1, not {self.prefetch}")
        if self.heartbeat is not None and self.heartbeat < 0:
            raise ConfigError(f"heartbeat must be 0 (off) or more seconds, not {self.heartbeat}")
        if self.reply_timeout <= 0:
            raise ConfigError(f"reply_timeout must be positive, not {self.reply_timeout}")
        if self.chunk_size < 4096:
            raise ConfigError(f"chunk_size must be at least 4096 bytes, not {self.chunk_size}")
        if self.log_level.upper() not in _LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")

    @classmethod
    def resolve(cls, config_file: str | Path | None = None, **flags: Any) -> WorkerConfig:
        """Merge the file, the environment and the flags that were given (not None)."""
        settings: dict[str, Any] = {}
        if config_file is not None:
            settings.update(_read_file(Path(config_file)))
        if os.environ.get(BROKER_ENV):
            settings["broker"] = os.environ[BROKER_ENV]
        settings.update({k: v for k, v in flags.items() if v is not None})
        for required in ("id", "broker"):
            if required not in settings:
                how = "--id" if required == "id" else f"--broker, set {BROKER_ENV},"
                raise ConfigError(f"no worker {required}: pass {how} or set it in a config file")
        return cls(**settings)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    section = document.get("worker")
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path} has no [worker] table")
    known = {f.name: f.type for f in dataclasses.fields(WorkerConfig)}
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {unknown}; known: {sorted(known)}")
    expected: dict[str, tuple[type, ...]] = {
        "id": (str,), "broker": (str,), "prefetch": (int,), "heartbeat": (int,),
        "reply_timeout": (int, float), "chunk_size": (int,), "log_level": (str,),
    }
    for key, value in section.items():
        if not isinstance(value, expected[key]) or isinstance(value, bool):
            kinds = " or ".join(t.__name__ for t in expected[key])
            raise ConfigError(f"config file {path}: {key} must be {kinds}")
    return dict(section)
