"""The RabbitMQ management HTTP API: what the console shows, for scripts (stdlib only).

The console and this API are one plugin (`rabbitmq_management`, port 15672). The
credentials default to those of the AMQP URL, which is how a participant sees
its own virtual host.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from .._errors import BrokerError
from .._names import broker_addresses

__all__ = ["ManagementAPI", "ManagementError"]

DEFAULT_PORT = 15672


class ManagementError(BrokerError):
    """The management API could not be reached, or refused a request."""


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


class ManagementAPI:
    """The management API of the RabbitMQ that `amqp_url` points at (or at `base`)."""

    def __init__(self, amqp_url: str, base: str | None = None, timeout: float = 10.0) -> None:
        amqp_url = broker_addresses(amqp_url)[0]  # a cluster's: its first node's API
        parts = urllib.parse.urlsplit(amqp_url)
        scheme = "https" if parts.scheme == "amqps" else "http"
        default = f"{scheme}://{parts.hostname or 'localhost'}:{DEFAULT_PORT}"
        given = urllib.parse.urlsplit((base or default).rstrip("/"))
        if given.scheme not in ("http", "https") or not given.hostname:
            raise ValueError("the management API is reached over http(s)://host[:port], not "
                             f"{_without_password(base or default)!r}")
        # Credentials in the API's URL (http://user:password@host:15672, as curl and the
        # console take them) are the API's; else those of the AMQP URL.
        credentials = given if given.username is not None else parts
        self.base = given._replace(netloc=given.netloc.rpartition("@")[2]).geturl()
        self.user = urllib.parse.unquote(credentials.username or "guest")
        password = urllib.parse.unquote(credentials.password or "guest")
        token = base64.b64encode(f"{self.user}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        self.amqp_url = amqp_url
        self.vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request; the decoded JSON answer (None when empty)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - http(s) only, checked in __init__
            self.base + path, data=data, method=method, headers=self._headers
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                text = response.read()
        except urllib.error.HTTPError as e:
            raise ManagementError(
                f"{method} {path} on {self.base}: HTTP {e.code} {e.reason}"
            ) from None
        except (OSError, urllib.error.URLError) as e:
            raise ManagementError(f"no RabbitMQ management API at {self.base}: {e}") from None
        return json.loads(text) if text else None

    def available(self) -> bool:
        try:
            self.call("GET", "/api/overview")
        except ManagementError:
            return False
        return True

    @staticmethod
    def quote(name: str) -> str:
        return urllib.parse.quote(name, safe="")

    # -- virtual hosts --------------------------------------------------------------------

    def create_vhost(self, name: str) -> str:
        """Create `name` with full permissions for our user; return its AMQP URL."""
        quoted = self.quote(name)
        self.call("PUT", f"/api/vhosts/{quoted}", {})
        self.call("PUT", f"/api/permissions/{quoted}/{self.quote(self.user)}",
                  {"configure": ".*", "write": ".*", "read": ".*"})
        parts = urllib.parse.urlsplit(self.amqp_url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + quoted))

    def delete_vhost(self, name: str) -> None:
        self.call("DELETE", f"/api/vhosts/{self.quote(name)}")

    # -- what the console shows -------------------------------------------------------------

    def connections(self, vhost: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call(
            "GET", f"/api/vhosts/{self.quote(vhost or self.vhost)}/connections"
        )
        return result

    def queue(self, name: str, vhost: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.call(
            "GET", f"/api/queues/{self.quote(vhost or self.vhost)}/{self.quote(name)}"
        )
        return result

    def queues(self, vhost: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call(
            "GET", f"/api/queues/{self.quote(vhost or self.vhost)}"
        )
        return result

    def close_connection(self, name: str) -> None:
        self.call("DELETE", f"/api/connections/{self.quote(name)}")

    def get_when(self, path: str, ready: Callable[[Any], bool], timeout: float = 15.0) -> Any:
        """GET `path` until `ready(result)`: statistics lag a few seconds behind."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.call("GET", path)
            if ready(result) or time.monotonic() > deadline:
                return result
            time.sleep(0.25)

    def wait_for_connections(
        self, predicate: Callable[[list[dict[str, Any]]], bool], vhost: str | None = None,
        timeout: float = 15.0,
    ) -> list[dict[str, Any]]:
        """Connection stats lag a few seconds behind; poll until `predicate(list)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            connections = self.connections(vhost)
            if predicate(connections) or time.monotonic() > deadline:
                return connections
            time.sleep(0.25)
