"""torchrelay.broker: the shared base of workers and clients.

Wire protocol (frozen dataclasses, no I/O), the tensor codec, the `Broker`
interface with its RabbitMQ and in-process implementations, the vocabulary of
allow-listed operations, and the exception tree. Nothing here imports the
worker or the client. Names are imported on first use (`_lazy.py`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:
    from ._chunks import Dropped, Reassembler, split_frame
    from ._codec import TENSOR_DTYPES, Body, EncodeError, Frame, decode, encode, tensor_buffer
    from ._embedded import EmbeddedBroker, EmbeddedEndpoint
    from ._errors import (
        BrokerError,
        BrokerUnavailable,
        ConnectionLost,
        DecodeError,
        EarlierFailure,
        ObjectNotFound,
        OperationRefused,
        PrivateDataError,
        ProtocolError,
        RemoteError,
        ReplyTimeout,
        TorchRelayError,
        UnknownBrokerURL,
        UnknownWorker,
    )
    from ._gone import GONE_AFTER_SECONDS, GONE_CHECK_SECONDS, GoneWatch, gone_message
    from ._names import (
        APP_ID,
        BROKER_ENV,
        COMMAND_EXCHANGE,
        DEFAULT_CHUNK_SIZE,
        DEFAULT_QUEUE_EXPIRES,
        EVENTS_EXCHANGE,
        PRESENCE_ASK,
        QUEUE_TYPES,
        RETURNED,
        SHARED_ACCOUNTS,
        TLS_ENV,
        broker_addresses,
        default_url,
        is_reply_queue_of,
        reply_queue,
        worker_queue,
    )
    from ._ops import is_inplace, wire_name
    from ._ops import resolve as resolve_op
    from ._protocol import (
        BATCH,
        COMMANDS,
        MAX_BATCH,
        MAX_HOPS,
        MAX_PLAN_CALLS,
        Batched,
        Call,
        Command,
        DefinePlan,
        Delete,
        Describe,
        Envelope,
        Fetch,
        Grant,
        Meta,
        Pull,
        RunPlan,
        Search,
        Status,
        Store,
        Transfer,
        command,
        decode_batch,
        decode_command,
        encode_batch,
    )
    from ._protocol_private import (
        Aggregate,
        ChargePrivacy,
        DpTrain,
        SecAggCommit,
        SecAggIntroduce,
        SecAggJoin,
        SecAggMask,
        SecAggShare,
        SecAggShares,
        SecAggUnmask,
        SecAggView,
        SecAggViewIs,
        SecureAggregate,
    )
    from ._rabbitmq import (
        ManagementAPI,
        ManagementError,
        RabbitMQBroker,
        RabbitMQEndpoint,
        SharedConnection,
        redact_url,
    )
    from ._refs import ObjectRef, PointerRef, format_pointer, new_object_id
    from ._replies import (
        ErrorInfo,
        Reply,
        decode_reply,
        decode_reply_batch,
        encode_reply_batch,
        is_plain_ok,
        session_and_number,
    )
    from ._trace import stamp
    from ._transport import Broker, Delivery, Endpoint
    from ._urls import open_broker

__all__, __getattr__ = lazy_exports(__name__, __file__)

logging.getLogger("torchrelay").addHandler(logging.NullHandler())
