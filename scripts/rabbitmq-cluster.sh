#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this host, for the cluster tests and benchmarks.
#
#   scripts/rabbitmq-cluster.sh start    nodes hare1..3@localhost on ports 5681..5683,
#                                        joined into one cluster (idempotent)
#   scripts/rabbitmq-cluster.sh stop     stops all three and removes their data
#   scripts/rabbitmq-cluster.sh status   the cluster's status
#   scripts/rabbitmq-cluster.sh stop-node N / start-node N   one node (N = 1..3)
#   scripts/rabbitmq-cluster.sh leader QUEUE   the node (1..3) leading quorum queue QUEUE
#
# The nodes share the `rabbitmq` user's Erlang cookie and run as that user, with data
# folders of their own under $TORCHRELAY_CLUSTER_DIR (default /tmp/torchrelay-cluster):
# the machine's own RabbitMQ (rabbit@localhost, 5672) is not touched. Needs root (or
# sudo) and rabbitmq-server installed.
set -euo pipefail

base="${TORCHRELAY_CLUSTER_DIR:-/tmp/torchrelay-cluster}"
first_port=5681
nodes=(1 2 3)

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
node() { echo "hare$1@localhost"; }
ctl() { as_root rabbitmqctl -q -n "$(node "$1")" "${@:2}"; }

start_node() {
  local i=$1 dir="$base/n$1"
  if ctl "$i" status >/dev/null 2>&1; then return 0; fi
  as_root mkdir -p "$dir"
  echo "[]." | as_root tee "$dir/enabled_plugins" >/dev/null
  as_root chown -R rabbitmq:rabbitmq "$base"
  as_root runuser -u rabbitmq -- env \
    RABBITMQ_NODENAME="$(node "$i")" \
    RABBITMQ_NODE_PORT=$((first_port + i - 1)) \
    RABBITMQ_DIST_PORT=$((25680 + i)) \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" RABBITMQ_CONFIG_FILE="$dir/rabbitmq" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" HOME=/var/lib/rabbitmq \
    rabbitmq-server -detached
  as_root rabbitmqctl -q -n "$(node "$i")" wait --timeout 60 "$dir/pid" >/dev/null
}

joined() {  # whether node $1 is a running member of node 1's cluster
  ctl 1 cluster_status --formatter json 2>/dev/null | python3 -c '
import json, sys
status = json.load(sys.stdin)
sys.exit(0 if sys.argv[1] in status.get("running_nodes", []) else 1)' "$(node "$1")"
}

leader() {  # the node (1..3) that leads quorum queue $1, as the first node up says
  local i
  for i in "${nodes[@]}"; do
    if ctl "$i" list_queues name leader --formatter json 2>/dev/null | python3 -c '
import json, sys
for row in json.load(sys.stdin):
    if row["name"] == sys.argv[1]:
        print(row["leader"].split("@")[0].removeprefix("hare"))
        sys.exit(0)
sys.exit(1)' "$1"; then return 0; fi
  done
  echo "no node of the cluster knows queue $1" >&2
  return 1
}

case "${1:-}" in
  start)
    command -v rabbitmq-server >/dev/null || { echo "rabbitmq-server is not installed" >&2; exit 1; }
    for i in "${nodes[@]}"; do start_node "$i" & done
    wait
    for i in 2 3; do
      if ! joined "$i"; then
        ctl "$i" stop_app
        ctl "$i" reset
        ctl "$i" join_cluster "$(node 1)"
        ctl "$i" start_app
      fi
    done
    echo "RabbitMQ cluster up: amqp://guest:guest@localhost:5681,5682,5683"
    ;;
  stop)
    for i in "${nodes[@]}"; do ctl "$i" stop >/dev/null 2>&1 & done
    wait
    as_root rm -rf "$base"
    ;;
  status) ctl 1 cluster_status ;;
  stop-node) ctl "$2" stop ;;
  start-node) start_node "$2" ;;
  leader) leader "$2" ;;
  *) echo "usage: $0 start|stop|status|stop-node N|start-node N|leader QUEUE" >&2; exit 2 ;;
esac
