"""The bare pika echo server: `python -m benchmarks.echo_server URL QUEUE PREFETCH`.

It is the floor any broker-based pointer system pays per command (the anchor
`pika_rpc.py`): consume, publish the body back to `reply_to`, ack. It runs in a
child process, as a torchrelay worker daemon does. It prints `ready` once it
consumes, and exits by itself if its parent goes away, so an interrupted
benchmark leaves no orphan behind (its queue is auto-delete).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import pika

# Stamps only when the benchmark's breakdown traces this process (`TORCHRELAY_TRACE`).
from torchrelay.broker._trace import stamp


def serve(url: str, queue: str, prefetch: int) -> None:
    parent = os.getppid()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue, auto_delete=True)
    channel.basic_qos(prefetch_count=prefetch)

    def echo(ch: Any, method: Any, props: Any, body: bytes) -> None:
        stamp("received", props.correlation_id)
        reply = pika.BasicProperties(correlation_id=props.correlation_id)
        stamp("publish", props.correlation_id)
        ch.basic_publish("", props.reply_to, body, reply)
        stamp("published", props.correlation_id)
        ch.basic_ack(method.delivery_tag)
        stamp("worker.done")

    def watch_parent() -> None:
        if os.getppid() != parent:
            channel.stop_consuming()
        else:
            connection.call_later(1.0, watch_parent)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)  # exits as from the end: a traced run writes its stamps

    signal.signal(signal.SIGTERM, stop)
    channel.basic_consume(queue, echo)
    connection.call_later(1.0, watch_parent)
    print("ready", flush=True)
    try:
        channel.start_consuming()
    finally:
        if connection.is_open:
            connection.close()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
