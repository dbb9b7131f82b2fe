"""torchrelay.broker: the shared base of workers and clients.

Wire protocol (frozen dataclasses, no I/O), the tensor codec, the `Broker`
interface with its RabbitMQ and in-process implementations, the vocabulary of
allow-listed operations, and the exception tree. Nothing here imports the
worker or the client.
"""

from __future__ import annotations

import logging

from ._chunks import DEFAULT_CHUNK_SIZE, Dropped, Reassembler, split_frame
from ._codec import Body, EncodeError, Frame, decode, encode, tensor_buffer
from ._embedded import EmbeddedBroker, EmbeddedEndpoint
from ._errors import (
    BrokerError,
    BrokerUnavailable,
    ConnectionLost,
    DecodeError,
    EarlierFailure,
    ObjectNotFound,
    OperationRefused,
    ProtocolError,
    RemoteError,
    ReplyTimeout,
    TorchRelayError,
    UnknownBrokerURL,
    UnknownWorker,
)
from ._ops import is_inplace, wire_name
from ._ops import resolve as resolve_op
from ._protocol import (
    COMMANDS,
    MAX_HOPS,
    Call,
    Command,
    Delete,
    Describe,
    Envelope,
    ErrorInfo,
    Fetch,
    Meta,
    Pull,
    Reply,
    Status,
    Store,
    Transfer,
    command,
    decode_command,
    decode_reply,
    session_and_number,
)
from ._rabbitmq import (
    ManagementAPI,
    ManagementError,
    RabbitMQBroker,
    RabbitMQEndpoint,
    redact_url,
)
from ._refs import ObjectRef, PointerRef, format_pointer, new_object_id
from ._transport import (
    APP_ID,
    COMMAND_EXCHANGE,
    RETURNED,
    Broker,
    Delivery,
    Endpoint,
    worker_queue,
)
from ._urls import BROKER_ENV, default_url, open_broker

__all__ = [
    "APP_ID",
    "BROKER_ENV",
    "COMMANDS",
    "COMMAND_EXCHANGE",
    "DEFAULT_CHUNK_SIZE",
    "MAX_HOPS",
    "RETURNED",
    "Body",
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Call",
    "Command",
    "ConnectionLost",
    "DecodeError",
    "Delete",
    "Delivery",
    "Describe",
    "Dropped",
    "EarlierFailure",
    "EmbeddedBroker",
    "EmbeddedEndpoint",
    "EncodeError",
    "Endpoint",
    "Envelope",
    "ErrorInfo",
    "Fetch",
    "Frame",
    "ManagementAPI",
    "ManagementError",
    "Meta",
    "ObjectNotFound",
    "ObjectRef",
    "OperationRefused",
    "PointerRef",
    "ProtocolError",
    "Pull",
    "RabbitMQBroker",
    "RabbitMQEndpoint",
    "Reassembler",
    "RemoteError",
    "Reply",
    "ReplyTimeout",
    "Status",
    "Store",
    "TorchRelayError",
    "Transfer",
    "UnknownBrokerURL",
    "UnknownWorker",
    "command",
    "decode",
    "decode_command",
    "decode_reply",
    "default_url",
    "encode",
    "format_pointer",
    "is_inplace",
    "new_object_id",
    "open_broker",
    "redact_url",
    "resolve_op",
    "session_and_number",
    "split_frame",
    "tensor_buffer",
    "wire_name",
    "worker_queue",
]

logging.getLogger("torchrelay").addHandler(logging.NullHandler())
