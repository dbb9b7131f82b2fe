"""One RabbitMQ user per participant, and the permissions that keep each to its own.

Set through the management HTTP API by an administrator (`torchrelay users`).
Permissions are regular expressions on resource names; what each role gets:

- a client `c`: configure (declare, delete) and read (consume) its reply queues
  `torchrelay.reply.c.*`; write (publish) to `torchrelay.commands` and
  `torchrelay.events` (a command to every worker: who is there) only;
- a worker `w`: configure and read its command queue `torchrelay.worker.w` and
  its reply queues; write to `torchrelay.commands` (commands to other workers),
  `torchrelay.events` (its announcements),
  `torchrelay.dead` (commands it refuses for good) and the default exchange
  (replies, addressed by queue name).

Nobody but the administrator may read from `torchrelay.commands`, which binding a
queue to it needs: so nobody can copy another worker's commands or squat its
routing key. The administrator declares the shared topology and binds each
worker's queue when the worker's user is added. What permissions cannot say —
that a reply really comes from the worker asked, that a transfer's chunks come
from the worker that started it — the broker-validated `user_id` property says,
which every message carries and RabbitMQ checks against the connection's user.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any, Final, Literal

from .._names import COMMAND_EXCHANGE, EVENTS_EXCHANGE, PRESENCE_ASK, worker_queue
from ._management import ManagementAPI, ManagementError
from ._topology import DEAD_LETTERS, QueueSettings, worker_queue_arguments

__all__ = ["ROLES", "Role", "UserInfo", "add_user", "list_users", "permissions", "remove_user"]

Role = Literal["worker", "client"]
ROLES: Final[tuple[Role, ...]] = ("worker", "client")
_TAG_PREFIX: Final = "torchrelay-"
_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class UserInfo:
    name: str
    role: Role


def permissions(name: str, role: Role) -> dict[str, str]:
    """The configure/write/read expressions `name` gets in its virtual host."""
    own = re.escape(name)
    replies = rf"torchrelay\.reply\.{own}\.[^.]+"
    if role == "client":
        exchanges = "|".join(re.escape(e) for e in (COMMAND_EXCHANGE, EVENTS_EXCHANGE))
        return {"configure": f"^{replies}$", "write": f"^({exchanges})$",
                "read": f"^{replies}$"}
    queue = re.escape(worker_queue(name))
    shared = "|".join(re.escape(e) for e in (COMMAND_EXCHANGE, EVENTS_EXCHANGE, DEAD_LETTERS,
                                              "amq.default"))
    return {"configure": f"^({queue}|{replies})$", "write": f"^({shared})$",
            "read": f"^({queue}|{replies})$"}


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"a participant's name is 1 to 64 letters, digits, '_' or '-', "
                         f"not {name!r}")
    return name


def add_user(api: ManagementAPI, name: str, role: Role, password: str | None = None,
             queue: QueueSettings | None = None) -> str:
    """Create (or update) `name` with `role`'s permissions; return its password.

    For a worker, also declares the shared exchanges and its queue (as `queue`
    says: classic or quorum, its expiry), bound to its routing key, as the
    administrator: the worker itself may not bind.
    """
    check_name(name)
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    password = password or secrets.token_urlsafe(18)
    user, vhost = api.quote(name), api.quote(api.vhost)
    api.call("PUT", f"/api/users/{user}", {"password": password, "tags": _TAG_PREFIX + role})
    api.call("PUT", f"/api/permissions/{vhost}/{user}", permissions(name, role))
    if role == "worker":
        declare_worker_topology(api, name, queue)
    return password


def declare_worker_topology(api: ManagementAPI, worker_id: str,
                            queue_settings: QueueSettings | None = None) -> None:
    """The exchanges, the dead-letter queue and `worker_id`'s bound queue, as the
    daemon itself declares them. A queue already there with other arguments (another
    type or expiry) is refused, naming them: RabbitMQ cannot change them in place."""
    vhost, commands = api.quote(api.vhost), api.quote(COMMAND_EXCHANGE)
    dead, events = api.quote(DEAD_LETTERS), api.quote(EVENTS_EXCHANGE)
    queue = api.quote(worker_queue(worker_id))
    api.call("PUT", f"/api/exchanges/{vhost}/{commands}", {"type": "direct", "durable": True})
    api.call("PUT", f"/api/exchanges/{vhost}/{events}", {"type": "topic", "durable": True})
    api.call("PUT", f"/api/exchanges/{vhost}/{dead}", {"type": "fanout", "durable": True})
    api.call("PUT", f"/api/queues/{vhost}/{dead}", {"durable": True})
    api.call("POST", f"/api/bindings/{vhost}/e/{dead}/q/{dead}", {"routing_key": ""})
    arguments = worker_queue_arguments(queue_settings or QueueSettings())
    try:
        api.call("PUT", f"/api/queues/{vhost}/{queue}", {"durable": True, "arguments": arguments})
    except ManagementError as e:
        if "HTTP 400" not in str(e):  # (RabbitMQ's "inequivalent arg" for another kind)
            raise
        raise ManagementError(
            f"queue {worker_queue(worker_id)} exists with other arguments than {arguments}: "
            "delete it in the console (with what it holds) to have it declared anew") from None
    api.call("POST", f"/api/bindings/{vhost}/e/{commands}/q/{queue}",
             {"routing_key": worker_id})
    api.call("POST", f"/api/bindings/{vhost}/e/{events}/q/{queue}",
             {"routing_key": PRESENCE_ASK})


def remove_user(api: ManagementAPI, name: str) -> None:
    """Delete `name` (its connections are closed by the broker); a worker's queue stays,
    with what is in it, until deleted in the console."""
    try:
        api.call("DELETE", f"/api/users/{api.quote(check_name(name))}")
    except ManagementError as e:
        if "HTTP 404" in str(e):
            raise ManagementError(f"there is no user {name!r}") from None
        raise


def list_users(api: ManagementAPI) -> list[UserInfo]:
    """The users `add_user` made, by name."""
    found: list[UserInfo] = []
    for user in api.call("GET", "/api/users"):
        tags: Any = user.get("tags", [])
        for tag in tags if isinstance(tags, list) else str(tags).split(","):
            role = tag.strip().removeprefix(_TAG_PREFIX)
            if tag.strip().startswith(_TAG_PREFIX) and role in ROLES:
                found.append(UserInfo(user["name"], role))
    return sorted(found, key=lambda u: u.name)
