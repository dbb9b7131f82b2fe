"""How a worker daemon logs: text for people, or JSON lines for log shippers.

Only the processes a command line starts (the daemon, its executor) configure
logging; the package itself adds no handlers. Every line names the worker; a
command's line carries its name, sender, correlation id and object ids as fields
of its own in JSON.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Final

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JSONFormatter", "configure_logging"]

LOG_FORMATS: Final = ("text", "json")
"""text lines, or one JSON object per line for log shippers."""
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
_COMMAND_FIELDS: Final = ("command", "sender", "correlation_id", "objects")


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, worker, process, message, and a
    command's fields when the record has them."""

    def __init__(self, worker_id: str | None, role: str) -> None:
        super().__init__()
        self.worker_id = worker_id
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name,
            "worker": self.worker_id or record.threadName,
            "process": self.role, "pid": record.process, "message": record.getMessage(),
        }
        for field in _COMMAND_FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_format: str, worker_id: str | None, role: str) -> None:
    """Log to stderr at `level` in `log_format`; pika's chatter only from WARNING on,
    unless `level` is DEBUG. `role` ("supervisor", "executor") tells the processes of
    one daemon apart. With `worker_id` None (a process hosting several workers, each
    in a thread named after it) every line names its thread."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JSONFormatter(worker_id, role))
    else:
        tag = "" if role == "supervisor" else f" [{role} %(process)d]"
        tag += " [%(threadName)s]" if worker_id is None else ""
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level.upper() != "DEBUG":
        logging.getLogger("pika").setLevel(logging.WARNING)
