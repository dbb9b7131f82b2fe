"""A few calls to the RabbitMQ management API, for tests (stdlib only)."""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/")
MANAGEMENT_URL = os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://localhost:15672")


class ManagementAPI:
    def __init__(self, base: str = MANAGEMENT_URL, amqp_url: str = AMQP_URL) -> None:
        parts = urllib.parse.urlsplit(amqp_url)
        self.base = base.rstrip("/")
        user, password = parts.username or "guest", parts.password or "guest"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        self.amqp_url = amqp_url
        self.user = user

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers=self.headers
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else None

    def available(self) -> bool:
        try:
            self.call("GET", "/api/overview")
        except (OSError, urllib.error.URLError):
            return False
        return True

    def create_vhost(self, name: str) -> str:
        """Create `name` with full permissions for our user; return its AMQP URL."""
        quoted = urllib.parse.quote(name, safe="")
        self.call("PUT", f"/api/vhosts/{quoted}", {})
        self.call("PUT", f"/api/permissions/{quoted}/{self.user}",
                  {"configure": ".*", "write": ".*", "read": ".*"})
        parts = urllib.parse.urlsplit(self.amqp_url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + quoted))

    def delete_vhost(self, name: str) -> None:
        self.call("DELETE", f"/api/vhosts/{urllib.parse.quote(name, safe='')}")

    def connections(self, vhost: str) -> list[dict[str, Any]]:
        quoted = urllib.parse.quote(vhost, safe="")
        result: list[dict[str, Any]] = self.call("GET", f"/api/vhosts/{quoted}/connections")
        return result

    def wait_for_connections(
        self, vhost: str, predicate: Any, timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        """Connection stats lag a few seconds behind; poll until `predicate(list)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            connections = self.connections(vhost)
            if predicate(connections) or time.monotonic() > deadline:
                return connections
            time.sleep(0.25)

    def get_when(self, path: str, ready: Any, timeout: float = 15.0) -> Any:
        """GET `path` until `ready(result)`: statistics lag a few seconds behind."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.call("GET", path)
            if ready(result) or time.monotonic() > deadline:
                return result
            time.sleep(0.25)

    def close_connection(self, name: str) -> None:
        self.call("DELETE", f"/api/connections/{urllib.parse.quote(name, safe='')}")
