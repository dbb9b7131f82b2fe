"""A worker daemon's settings: defaults, a TOML file, the environment, the command line.

    [worker]
    id = "bob"
    broker = "amqp://guest:guest@localhost:5672/"
    prefetch = 128            # messages delivered ahead of the one being executed
    heartbeat = 30            # seconds; the connection stays alive during long commands
    reply_timeout = 60.0      # seconds to wait for another worker down a chain
    gone_after = 15.0         # seconds another worker's queue may go without a daemon
                              # before a wait on it fails (it is gone)
    chunk_size = 8388608      # bytes; larger messages travel as chunks of this size
    log_level = "INFO"
    log_format = "text"       # or "json": one object per line, for log shippers
    command_timeout = 60.0    # seconds one command may run before it is stopped
    stop_grace = 30.0         # seconds a stopping daemon lets the command in hand finish
    max_elements = 268435456  # elements of any tensor a command may make (views too)
    max_bytes = 8589934592    # bytes of tensors the worker may hold (default: half the RAM)
    max_list_elements = 1048576  # elements of a Python list a command may build (tolist)
    torch_threads = 1         # torch's threads for one operation (default: torch's, one per
                              # core; 1 when several workers share a machine's cores)
    shared_accounts = ["guest"]  # broker users several participants share: a message from
                              # one is trusted to name its sender. [] on a shared broker,
                              # where every participant has a user (`torchrelay users add`)
                              # and the worker's id is its user's name
    presence_interval = 10.0  # seconds between two heartbeats on torchrelay.events
    queue_type = "classic"    # or "quorum": replicated by a RabbitMQ cluster (a second
                              # daemon for the same id then waits as a standby)
    queue_expires = 604800.0  # seconds the worker's queue outlives its last daemon
    clients = ["ann", "ben"]  # who may use this worker's datasets (default: every client)
    lease = 600.0             # seconds a gone participant's objects are kept (a reconnect
                              # within it loses nothing), then deleted
    sender_max_queued = 32    # messages one sender may have waiting in the worker's hand
                              # (default: no limit; see worker/runtime/_fairness.py)
    sender_strikes = 3        # commands of one sender past command_timeout (or crashing
    sender_penalty = 300.0    #   the executor) within this many seconds: it is refused
                              #   for that long after the last (see worker/runtime/_fairness.py)
    fault_injection = false   # the test suite's operations that hold a worker for a given
                              # time (worker/runtime/_faults.py); never on a worker others use
    # tls_ca_file = "ca.pem"      amqps://: the CA that signed the broker's certificate
    #                             (default: the system's); paths relative to this file
    # tls_cert_file = "bob.pem"   amqps://: a client certificate to present, and its key
    # tls_key_file = "bob.key"

    [[worker.datasets]]          # data the worker loads at start-up and offers (any number)
    path = "data/bob-digits.safetensors"   # relative to this file
    tags = ["#digits", "#train"]
    description = "8x8 digits, bob's share"
    private = true               # the default: nothing derived from it leaves but an
                                 # aggregate (see [worker.privacy], worker/runtime/_privacy.py)

    [worker.privacy]             # the owner's rules for its private data
    k = 2
    clip = 1.0
    noise_multiplier = 1.0
    epsilon = 10.0
    delta = 1e-5
    trusted = ["secure_worker"]
    signing_key = "bob.key"      # secure aggregation through a broker not trusted (see
    [worker.privacy.peer_keys]   # worker/runtime/_signing.py): bob's Ed25519 key, and the
    alice = "q0T5...base64="     # other owners' public keys (`torchrelay keygen`)

Later sources win: file < `TORCHRELAY_BROKER` < command-line flags. Each
setting's type is its field's annotation here, so the file is checked against
the same declaration the daemon reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from torchrelay.broker import (
    BROKER_ENV,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_QUEUE_EXPIRES,
    GONE_AFTER_SECONDS,
    QUEUE_TYPES,
    SHARED_ACCOUNTS,
    broker_addresses,
)

from ..runtime._datasets import DatasetError, DatasetSpec
from ..runtime._leases import DEFAULT_LEASE, DEFAULT_PRESENCE_INTERVAL
from ..runtime._limits import Limits, default_max_bytes
from ..runtime._privacy import PrivacyError, PrivacyPolicy, default_ledger
from ..runtime._signing import KeyFileError
from ._logs import LOG_FORMATS, LOG_LEVELS

__all__ = ["ConfigError", "JoinedFlag", "WorkerConfig"]

_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ConfigError(ValueError):
    """A setting that is missing or wrong; the message names it."""


_LIMITS: Final = Limits()


def _setting(default: Any = dataclasses.MISSING, flag: str | None = None, *,
             factory: Any = dataclasses.MISSING, shown: str | None = None,
             choices: tuple[str, ...] | None = None, repeated: bool = False) -> Any:
    """A setting of the file and, with `flag` (its help), of `torchrelay worker`'s command
    line as `--its-name`; `shown` says the default where its value would not; `repeated`:
    the flag may be given several times (the values joined with commas, as a list in the
    file is)."""
    return field(default=default, default_factory=factory,
                 metadata={"flag": flag, "shown": shown, "choices": choices,
                           "repeated": repeated})


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Every setting of a worker daemon, declared once: the TOML file's `[worker]` table
    is checked against these annotations, and the command line's flags are made from
    them (`add_flags`)."""

    id: str = _setting(flag="the worker's id (its queue is torchrelay.worker.<id>); several "
                            "(repeated or comma-separated), with --unsupervised: one process "
                            "hosts them all", repeated=True)
    broker: str = _setting(flag=f"amqp[s]:// URL (default: ${BROKER_ENV}); a cluster: each "
                                "node's, the flag repeated or comma-separated",
                           repeated=True)
    prefetch: int = _setting(128, "messages delivered ahead")
    heartbeat: int | None = _setting(30, "AMQP heartbeat in seconds")
    reply_timeout: float = _setting(60.0, "seconds to wait for another worker down a chain")
    gone_after: float = _setting(GONE_AFTER_SECONDS, "seconds another worker's queue may go "
                                                     "without a daemon before a wait on it "
                                                     "fails (longer than an executor's restart)")
    chunk_size: int = _setting(DEFAULT_CHUNK_SIZE, "bytes; larger messages travel in chunks",
                               shown="8 MiB")
    log_level: str = _setting("INFO", "how much the daemon logs", choices=LOG_LEVELS)
    log_format: str = _setting(LOG_FORMATS[0], "text lines, or one JSON object per line",
                               choices=LOG_FORMATS)
    command_timeout: float = _setting(_LIMITS.command_timeout,
                                      "seconds one command may run before it is stopped")
    stop_grace: float = _setting(30.0, "seconds a stopping daemon lets the command in hand "
                                       "finish")
    max_elements: int = _setting(_LIMITS.max_elements,
                                 "elements of any tensor a command may make", shown="2**28")
    max_bytes: int = _setting(flag="bytes the worker's objects may hold", factory=default_max_bytes,
                              shown="half the RAM")
    max_list_elements: int = _setting(_LIMITS.max_list_elements,
                                      "elements of a Python list a command may build",
                                      shown="2**20")
    torch_threads: int | None = _setting(None, "threads torch may use for one operation "
                                               "(1 when several workers share the cores)",
                                         shown="one per core")
    shared_accounts: tuple[str, ...] = SHARED_ACCOUNTS
    clients: tuple[str, ...] | None = None
    lease: float = _setting(DEFAULT_LEASE, "seconds the objects of a participant that is "
                                           "gone are kept before they are deleted")
    presence_interval: float = _setting(DEFAULT_PRESENCE_INTERVAL,
                                        "seconds between two heartbeats on torchrelay.events")
    queue_type: str = _setting(QUEUE_TYPES[0], "the worker queue's type (quorum for a "
                                               "cluster)", choices=QUEUE_TYPES)
    queue_expires: float = _setting(DEFAULT_QUEUE_EXPIRES, "seconds the worker's queue "
                                                           "outlives its last daemon",
                                    shown="a week")
    tls_ca_file: str | None = _setting(None, "amqps://: the CA that signed the broker's "
                                             "certificate", shown="the system's")
    tls_cert_file: str | None = _setting(None, "amqps://: a client certificate to present")
    tls_key_file: str | None = _setting(None, "amqps://: the client certificate's key")
    sender_max_queued: int | None = _setting(None, "messages one sender may have waiting in "
                                                   "the worker", shown="no limit")
    sender_strikes: int = _setting(3, "commands of one sender past command_timeout or "
                                      "crashing the executor that get it refused for a while")
    sender_penalty: float = _setting(300.0, "seconds those strikes count, and a struck "
                                            "sender is refused")
    fault_injection: bool = _setting(False, argparse.SUPPRESS)  # the test suite's only
    datasets: tuple[DatasetSpec, ...] = ()
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)

    def __post_init__(self) -> None:
        # From JSON (a supervisor handing its config to an executor) they come as maps.
        specs = tuple(d if isinstance(d, DatasetSpec) else DatasetSpec(
            d["path"], tuple(d.get("tags", ())), d.get("description", ""),
            d.get("private", True),
        ) for d in self.datasets)
        object.__setattr__(self, "datasets", specs)
        privacy: Any = self.privacy
        if isinstance(privacy, dict):
            try:
                object.__setattr__(self, "privacy", PrivacyPolicy.of(privacy))
            except PrivacyError as e:
                raise ConfigError(str(e)) from None
        if not _WORKER_ID.match(self.id):
            raise ConfigError(
                f"worker id {self.id!r} must be 1-128 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        try:
            addresses = broker_addresses(self.broker)
        except ValueError:
            addresses = ("",)
        for address in addresses:
            if not address.startswith(("amqp://", "amqps://")):
                raise ConfigError("broker must be an amqp:// or amqps:// URL (or several, "
                                  f"a cluster's), not {address!r}")
        if self.prefetch < 1:
            raise ConfigError(f"prefetch must be at least 1, not {self.prefetch}")
        if self.heartbeat is not None and self.heartbeat < 0:
            raise ConfigError(f"heartbeat must be 0 (off) or more seconds, not {self.heartbeat}")
        for positive in ("reply_timeout", "gone_after", "command_timeout", "stop_grace",
                         "max_elements", "max_bytes", "max_list_elements", "lease",
                         "presence_interval", "queue_expires", "sender_max_queued",
                         "sender_strikes", "sender_penalty"):
            value = getattr(self, positive)
            if value is not None and not value > 0:  # (TOML's nan too: it compares false)
                raise ConfigError(f"{positive} must be positive, not {value}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"torch_threads must be at least 1, not {self.torch_threads}")
        if type(self.fault_injection) is not bool:
            raise ConfigError("fault_injection must be true or false")
        if self.chunk_size < 4096:
            raise ConfigError(f"chunk_size must be at least 4096 bytes, not {self.chunk_size}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format must be {' or '.join(LOG_FORMATS)}, not "
                              f"{self.log_format!r}")
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigError(f"queue_type must be {' or '.join(QUEUE_TYPES)}, not "
                              f"{self.queue_type!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        for names in ("shared_accounts", "clients"):
            given: Any = getattr(self, names)
            if given is None and names == "clients":
                continue
            if not isinstance(given, list | tuple) or not all(isinstance(a, str) for a in given):
                raise ConfigError(f"{names} must be a list of user names, not {given!r}")
            object.__setattr__(self, names, tuple(given))
        tls_files = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if tls_files != (None, None, None) and not self.broker.startswith("amqps://"):
            raise ConfigError("tls_ca_file, tls_cert_file and tls_key_file need an amqps:// "
                              "broker URL")
        for name, file in zip(("tls_ca_file", "tls_cert_file", "tls_key_file"), tls_files,
                              strict=True):
            if file is not None and not Path(file).is_file():
                raise ConfigError(f"{name}: there is no file {file}")
        if self.privacy.signing_key is not None or self.privacy.peer_keys is not None:
            try:
                self.privacy.pinning(self.id)
            except KeyFileError as e:
                raise ConfigError(f"privacy {e}") from None
        first = broker_addresses(self.broker)[0]
        user = urllib.parse.unquote(urllib.parse.urlsplit(first).username or "guest")
        if user not in self.shared_accounts and user != self.id:
            raise ConfigError(
                f"worker {self.id!r} connects as RabbitMQ user {user!r}: with a user of its "
                f"own, a worker's id is its user's name (or list {user!r} in shared_accounts)")

    @property
    def ledger(self) -> Path:
        """Where this worker records its privacy releases (see `_privacy.py`)."""
        if self.privacy.ledger is not None:
            return Path(self.privacy.ledger)
        # One cluster, one ledger, whichever of its addresses are listed and in what order
        # (a single address: as it always was).
        return default_ledger(self.id, min(broker_addresses(self.broker)))

    @property
    def limits(self) -> Limits:
        return Limits(self.command_timeout, self.max_elements, self.max_bytes,
                      self.max_list_elements)

    @classmethod
    def resolve(
        cls, config_file: str | Path | None = None, *, dataset_flags: list[str] | None = None,
        public_dataset_flags: list[str] | None = None, **flags: Any,
    ) -> WorkerConfig:
        """Merge the file, the environment and the flags that were given (not None);
        `dataset_flags` and `public_dataset_flags` (`PATH:TAG[,TAG]`) add private and
        public datasets to the file's."""
        settings: dict[str, Any] = {}
        if config_file is not None:
            settings.update(_read_file(Path(config_file)))
        try:
            extra = (*(DatasetSpec.parse(text, Path.cwd()) for text in dataset_flags or ()),
                     *(dataclasses.replace(DatasetSpec.parse(text, Path.cwd()), private=False)
                       for text in public_dataset_flags or ()))
        except DatasetError as e:
            raise ConfigError(f"--dataset: {e}") from None
        if extra:
            settings["datasets"] = (*settings.get("datasets", ()), *extra)
        if os.environ.get(BROKER_ENV):
            settings["broker"] = os.environ[BROKER_ENV]
        settings.update({k: v for k, v in flags.items() if v is not None})
        for required in ("id", "broker"):
            if required not in settings:
                how = "--id" if required == "id" else f"--broker, set {BROKER_ENV},"
                raise ConfigError(f"no worker {required}: pass {how} or set it in a config file")
        return cls(**settings)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every setting declared with one (`--reply-timeout` for `reply_timeout`):
    its type, choices and default from the declaration."""
    hints = typing.get_type_hints(WorkerConfig)
    for setting in dataclasses.fields(WorkerConfig):
        text = setting.metadata.get("flag")
        if text is None:
            continue
        name = "--" + setting.name.replace("_", "-")
        kind = _accepted_types(hints[setting.name])[0]
        if kind is bool:  # (None when not given: the file's, or the default, stands)
            parser.add_argument(name, action="store_true", default=None, help=text)
            continue
        shown = setting.metadata.get("shown")
        if shown is None and setting.default not in (dataclasses.MISSING, None):
            shown = f"{setting.default:g}" if type(setting.default) is float else str(
                setting.default)
        if shown is not None and text is not argparse.SUPPRESS:
            text = f"{text} (default: {shown})"
        if setting.metadata.get("repeated"):
            parser.add_argument(name, action=JoinedFlag, help=text)
            continue
        parser.add_argument(name, type=kind, choices=setting.metadata.get("choices"),
                            help=text)


class JoinedFlag(argparse.Action):
    """A flag that may be given several times: its values joined with commas."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        given = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, str(values) if given is None else f"{given},{values}")


def flags_given(args: argparse.Namespace) -> dict[str, Any]:
    """The settings `add_flags` made flags for, as parsed (None: not given)."""
    return {setting.name: getattr(args, setting.name)
            for setting in dataclasses.fields(WorkerConfig) if setting.metadata.get("flag")}


def _accepted_types(annotation: Any) -> tuple[type, ...]:
    """The TOML value types a setting annotated `annotation` accepts."""
    kinds = typing.get_args(annotation) or (annotation,)
    accepted = tuple(k for k in kinds if k is not type(None))
    return (*accepted, int) if float in accepted else accepted  # 60 is a fine float


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
    section = dict(section)
    privacy = section.pop("privacy", None)
    if privacy is not None:
        if not isinstance(privacy, dict):
            raise ConfigError(f"config file {path}: privacy is a [worker.privacy] table")
        if isinstance(privacy.get("signing_key"), str):  # relative to the file
            privacy = {**privacy, "signing_key": str(path.parent / privacy["signing_key"])}
        try:
            policy = PrivacyPolicy.of(privacy)
        except (PrivacyError, TypeError) as e:
            raise ConfigError(f"config file {path}: {e}") from None
        if policy.ledger is not None and not Path(policy.ledger).is_absolute():
            policy = dataclasses.replace(policy, ledger=str(path.parent / policy.ledger))
        section["privacy"] = policy
    for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        if isinstance(section.get(name), str):
            section[name] = str(path.parent / section[name])  # relative to the file
    tables = section.pop("datasets", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"config file {path}: datasets are [[worker.datasets]] tables")
    try:
        datasets = tuple(DatasetSpec.of(table, path.parent) for table in tables)
    except DatasetError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    hints = typing.get_type_hints(WorkerConfig)
    known = {f.name: _accepted_types(hints[f.name]) for f in dataclasses.fields(WorkerConfig)
             if f.name not in ("datasets", "privacy", "shared_accounts", "clients")}
    known["shared_accounts"] = known["clients"] = (list,)
    if isinstance(section.get("broker"), list):  # a cluster's nodes
        if not all(isinstance(url, str) for url in section["broker"]):
            raise ConfigError(f"config file {path}: broker is a URL or a list of URLs")
        section["broker"] = ",".join(section["broker"])
    policy_given = section.pop("privacy", None)
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {unknown}; known: {sorted(known)}")
    for key, value in section.items():
        if not isinstance(value, known[key]) or (isinstance(value, bool)
                                                 and bool not in known[key]):
            kinds = " or ".join(t.__name__ for t in known[key])
            raise ConfigError(f"config file {path}: {key} must be {kinds}")
    if policy_given is not None:
        section["privacy"] = policy_given
    return {**section, "datasets": datasets} if datasets else section
