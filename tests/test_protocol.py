"""The protocol, declared once: every command round-trips, every field is checked."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import pytest
import torch

from torchrelay.broker import (
    COMMANDS,
    Call,
    Command,
    Describe,
    Envelope,
    Meta,
    ObjectRef,
    ProtocolError,
    Reply,
    Store,
    Transfer,
    command,
    decode_batch,
    decode_command,
    decode_reply,
    decode_reply_batch,
    encode,
    encode_batch,
    encode_reply_batch,
    session_and_number,
)
from torchrelay.broker import _protocol as protocol

# A value for each kind of field a command can declare, unlike any default.
_SAMPLES: dict[Any, Any] = {
    protocol.ObjectId: 2**53 - 7,
    protocol.Hops: 5,
    protocol.OpName: "Tensor.__add__",
    protocol.WorkerId: "secure_worker",
    protocol.Identity: "alice",
    protocol.Tag: "#digits",
    protocol.OptimizerName: "adam",
    protocol.RoundId: "0123456789abcdef0123456789abcdef",
    protocol.HexText: "00ff",
    protocol.Signature: "ab" * 64,
    bool: True,
    float: 0.25,
    list[Any]: [ObjectRef(3), 2.5, "x"],
    list[dict[str, Any]]: [{"op": "Tensor.__add__", "args": [ObjectRef(3), 1], "kwargs": {},
                            "result_id": 4, "hops": 0}],
    dict[str, Any]: {"alpha": 3},
    Any: torch.arange(4.0),
}


def _sample(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # `X | None`: an X
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation in _SAMPLES:
        return _SAMPLES[annotation]
    if typing.get_origin(annotation) is typing.Annotated:  # a constrained count
        return 7
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return [_sample(item), _sample(item)]
    raise AssertionError(f"no sample for fields annotated {annotation!r}")


def _everything_set(cls: type[Command]) -> Command:
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {f.name: _sample(hints[f.name]) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            assert values[f.name] != f.default, f"{cls.name}.{f.name}: sample equals default"
    return cls(**values)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_round_trips_with_every_field_set(name: str) -> None:
    original = _everything_set(COMMANDS[name])
    envelope = Envelope([4, 5], 17)

    decoded, carried = decode_command(name, original.encode(envelope).tobytes())

    assert carried == envelope
    assert type(decoded) is type(original)
    for f in dataclasses.fields(original):
        sent, got = getattr(original, f.name), getattr(decoded, f.name)
        if isinstance(sent, torch.Tensor):
            assert torch.equal(sent, got), f.name
        else:
            assert got == sent, f.name


def test_fields_with_defaults_may_be_left_out_and_unknown_ones_may_not() -> None:
    body = encode({"op": "torch.add", "args": [], "kwargs": {}, "result_id": None}).tobytes()
    decoded, envelope = decode_command("call", body)
    assert decoded == Call("torch.add", [], {}, None, 0)
    assert envelope == Envelope()
    body = encode({"id": 1, "path": "/etc/passwd"}).tobytes()
    with pytest.raises(ProtocolError, match=r"fetch: unknown fields \['path'\]"):
        decode_command("fetch", body)
    with pytest.raises(ProtocolError, match=r"missing fields \['op', 'result_id'\]"):
        decode_command("call", encode({"args": [], "kwargs": {}}).tobytes())


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("call", {"result_id": "7"}, "field 'result_id' must be an integer from 0 to"),
        ("call", {"result_id": -1}, "field 'result_id' must be an integer from 0 to"),
        ("call", {"hops": -1}, "field 'hops' must be an integer from 0 to 32, got int -1"),
        ("call", {"hops": 33}, "field 'hops' must be an integer from 0 to 32"),
        ("call", {"hops": True}, "field 'hops' must be an integer"),
        ("call", {"kwargs": {1: 2}}, "field 'kwargs' must be a map with string keys"),
        ("call", {"op": ""}, "field 'op' must be a non-empty string of at most 255"),
        ("call", {"op": "x" * 256}, "field 'op' must be a non-empty string of at most 255"),
        ("meta", {"hops": 2**40}, "field 'hops' must be an integer from 0 to 32"),
        ("delete", {"ids": [1, -2]}, "field 'ids' must be a list of an integer from 0"),
        ("delete", {"ids": [2**53]}, "field 'ids' must be a list of an integer from 0"),
        ("transfer", {"destination": "../bob"}, "field 'destination' must be 1 to 128 letters"),
        ("store", {"provenance": [""]}, "field 'provenance' must be a list of a non-empty"),
    ],
)
def test_every_field_is_range_checked_naming_it(
    name: str, values: dict[str, Any], message: str
) -> None:
    body = dataclasses.asdict(_everything_set(COMMANDS[name]))
    body.update(values)
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(")):
        decode_command(name, encode(body).tobytes())


@pytest.mark.parametrize(
    ("envelope", "message"),
    [
        ({"garbage": [1, "2"]}, "envelope: field 'garbage' must be a list of an integer"),
        ({"guard": -1}, "envelope: field 'guard' must be an integer from 0"),
    ],
)
def test_the_envelope_is_checked_too(envelope: dict[str, Any], message: str) -> None:
    body = encode({"id": 1, **envelope}).tobytes()
    with pytest.raises(ProtocolError, match=message):
        decode_command("fetch", body)


def test_a_command_is_its_declaration() -> None:
    @command("test-echo")
    class Echo(Command):
        value: Any
        times: int = 1

    try:
        decoded, _ = decode_command("test-echo", Echo([1, 2], 3).encode().tobytes())
        assert decoded == Echo([1, 2], 3)
        with pytest.raises(dataclasses.FrozenInstanceError):
            decoded.times = 4  # type: ignore[misc]
        with pytest.raises(TypeError, match="declared twice"):
            command("test-echo")(type("Again", (Command,), {"__annotations__": {}}))
        with pytest.raises(TypeError, match="envelope's field names"):
            command("test-clash")(type("Clash", (Command,), {"__annotations__": {"guard": "int"}}))
    finally:
        COMMANDS.pop("test-echo")
        COMMANDS.pop("test-clash", None)


def test_store_keeps_its_value_and_transfer_its_destination() -> None:
    store = Store(5, torch.ones(1), ["alice"])
    decoded, envelope = decode_command("store", store.encode(Envelope([7, 8])).tobytes())
    assert isinstance(decoded, Store)
    assert decoded.provenance == ["alice"]
    assert envelope.garbage == [7, 8]
    transfer = Transfer(1, "alice", 2, keep_pointer=True)
    assert decode_command("transfer", transfer.encode().tobytes())[0] == transfer
    assert decode_command("meta", Meta(9).encode().tobytes())[0] == Meta(9, 0)


@pytest.mark.parametrize(
    ("correlation_id", "expected"),
    [("me.1a2b.17", ("me.1a2b", 17)), ("a.b.c.0", ("a.b.c", 0)), ("c-1", None),
     ("me.x", None), (".5", None), ("me.1" + "0" * 30, None)],
)
def test_correlation_ids_split_into_session_and_number(
    correlation_id: str, expected: tuple[str, int] | None
) -> None:
    assert session_and_number(correlation_id) == expected


def test_a_batch_carries_commands_in_order_and_a_bad_one_does_not_sink_the_others() -> None:
    good = Call("Tensor.__add__", [ObjectRef(1), 2], {}, 7)
    body = encode_batch([(good, "me.s.1", None), (Meta(7), "me.s.2", Envelope([9], 1))])
    first, second = decode_batch(body.tobytes())
    assert (first.name, first.correlation_id, first.command) == ("call", "me.s.1", good)
    assert (second.command, second.envelope) == (Meta(7), Envelope([9], 1))

    mixed = encode({"commands": [
        ["fetch", "me.s.3", {"id": -1}],
        ["eval", "me.s.4", {"source": "1"}],
        ["describe", "me.s.5", {}],
    ]})
    bad_field, unknown, fine = decode_batch(mixed.tobytes())
    assert bad_field.command is None and "field 'id' must be" in str(bad_field.error)
    assert unknown.name == "invalid" and "unknown command 'eval'" in str(unknown.error)
    assert fine.command == Describe()
    for malformed in ({"commands": []}, {"commands": [["call", 5, {}]]}, {"other": 1}):
        with pytest.raises(ProtocolError, match="batch"):
            decode_batch(encode(malformed).tobytes())


def test_replies_travel_in_batches_too() -> None:
    replies = [("me.s.1", "call", Reply(None).encode()), ("me.s.2", "fetch", Reply(3).encode())]
    decoded = decode_reply_batch(encode_reply_batch(replies).tobytes())
    assert [(cid, name) for cid, name, _ in decoded] == [("me.s.1", "call"), ("me.s.2", "fetch")]
    assert decode_reply(decoded[1][2]).value == 3
    with pytest.raises(ProtocolError):
        decode_reply_batch(encode({"replies": [["x", "call", "not bytes"]]}).tobytes())


def test_a_new_command_is_its_declaration_and_its_handler() -> None:
    """As the README's "Adding a command" says: nothing else lists commands."""
    import torchrelay as tr  # noqa: PLC0415
    from torchrelay.worker.runtime._commands import HANDLERS, handles  # noqa: PLC0415

    @protocol.command("test.norm")
    class Norm(protocol.Command):
        id: protocol.ObjectId

    @handles(Norm)
    def norm(worker: Any, command: Norm, sender: str) -> float:
        return float(worker.store.use(command.id, sender).value.norm())

    try:
        with tr.connect() as fleet:
            tr.hook(torch)
            pointer = torch.tensor([3.0, 4.0]).send(fleet.worker("bob"))
            assert fleet.request("bob", Norm(pointer.id_at_location)) == 5.0
            with pytest.raises(tr.RemoteError, match="no object"):  # checked like any other
                fleet.request("bob", Norm(pointer.id_at_location + 1))
            with pytest.raises(RuntimeError, match="has a handler already"):
                handles(Norm)(norm)
    finally:
        del protocol.COMMANDS["test.norm"], HANDLERS[Norm]
