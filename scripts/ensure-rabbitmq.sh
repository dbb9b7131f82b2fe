#!/usr/bin/env bash
# Make sure a RabbitMQ with its management plugin answers on this machine.
# Starts the local server (installing Debian's rabbitmq-server if needed) only when
# AMQP_URL points at this machine and nothing answers there yet.
set -euo pipefail

url="${AMQP_URL:-amqp://guest:guest@localhost:5672/}"
host=$(python3 -c 'import sys, urllib.parse as u; print(u.urlsplit(sys.argv[1]).hostname or "localhost")' "$url")
port=$(python3 -c 'import sys, urllib.parse as u; print(u.urlsplit(sys.argv[1]).port or 5672)' "$url")

answers() { python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
except OSError:
    sys.exit(1)
PY
}

management_answers() { python3 - <<'PY'
import base64, sys, urllib.request
request = urllib.request.Request(
    "http://localhost:15672/api/overview",
    headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()})
try:
    urllib.request.urlopen(request, timeout=3).close()
except Exception:
    sys.exit(1)
PY
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

case "$host" in
  localhost|127.0.0.1|::1) ;;
  *) echo "RabbitMQ at $host:$port is not local; not starting one."; exit 0 ;;
esac

if ! answers "$host" "$port"; then
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "Installing rabbitmq-server (Debian package) ..."
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq rabbitmq-server
  fi
  echo "Starting RabbitMQ ..."
  as_root rabbitmq-server -detached
  # -detached returns before the node is reachable, even for rabbitmqctl: poll.
  for _ in $(seq 1 240); do
    answers "$host" "$port" && break
    sleep 0.5
  done
  answers "$host" "$port" || { echo "RabbitMQ did not start within 2 minutes" >&2; exit 1; }
  as_root rabbitmqctl await_startup --timeout 120 >/dev/null
fi

if ! management_answers; then
  echo "Enabling the RabbitMQ management plugin (console and API on :15672) ..."
  as_root rabbitmq-plugins enable rabbitmq_management >/dev/null
  for _ in $(seq 1 120); do
    management_answers && break
    sleep 0.5
  done
  management_answers || { echo "the management API did not come up" >&2; exit 1; }
fi
echo "RabbitMQ is up at $host:$port (console: http://localhost:15672)."
