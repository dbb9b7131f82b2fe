"""The codec and the protocol on their own: no broker, no I/O."""

from __future__ import annotations

import enum
import gc
import sys

import pytest
import torch

from torchrelay.broker import (
    DecodeError,
    EncodeError,
    ErrorInfo,
    ObjectRef,
    PointerRef,
    ProtocolError,
    Reply,
    decode,
    decode_reply,
    encode,
)


class Color(enum.IntEnum):
    RED = 1


def roundtrip(value: object) -> object:
    return decode(encode(value).tobytes())


def test_plain_values_roundtrip_with_their_types() -> None:
    value = {
        "none": None, "bool": True, "int": -(2**63), "float": 1.5, "str": "é", "bytes": b"\x00",
        "list": [1, [2]], "tuple": (1, (2, 3)), "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16, "slice": slice(1, None, 2), "ellipsis": ..., "complex": 1 - 2j,
        "refs": [ObjectRef(7), PointerRef("bob", 9)], 5: "int key", "enum": Color.RED,
    }
    back = roundtrip(value)
    assert back == {**value, "size": (2, 3), "enum": 1}
    assert isinstance(back["tuple"], tuple)
    assert isinstance(back["list"], list)


def test_tensors_keep_dtype_shape_values_and_requires_grad() -> None:
    tensors = [
        torch.randn(3, 4, requires_grad=True), torch.arange(6).reshape(2, 3).t(),
        torch.tensor(2.5), torch.zeros(0, 5), torch.randn(3, dtype=torch.complex128).conj(),
        -torch.ones(2, dtype=torch.float16),
        torch._neg_view(torch.tensor([1.0, -2.0])),  # real, negated only by a bit
    ]
    assert tensors[-1].is_neg() and tensors[-1].is_contiguous()
    back = roundtrip(tensors)
    assert isinstance(back, list)
    for original, decoded in zip(tensors, back, strict=True):
        assert decoded.dtype == original.dtype
        assert decoded.shape == original.shape
        assert torch.equal(decoded.detach(), original.detach().resolve_conj().resolve_neg())
        assert decoded.requires_grad == original.requires_grad


def test_tensor_bytes_are_not_copied_into_the_header() -> None:
    tensor = torch.ones(1 << 16)
    frame = encode({"value": tensor})
    assert frame.nbytes > tensor.numel() * 4
    assert len(frame.parts[1]) < 100  # the msgpack header is tiny
    assert any(isinstance(p, memoryview) and p.nbytes == 1 << 18 for p in frame.parts)


def test_decoding_a_writable_body_makes_views_not_copies() -> None:
    body = bytearray(encode(torch.arange(4, dtype=torch.int32)).tobytes())
    tensor = decode(body)
    body[-16:] = bytes(16)  # zero the tensor's bytes in the body
    assert tensor.tolist() == [0, 0, 0, 0]


def test_decoding_read_only_bytes_copies_once() -> None:
    body = encode(torch.arange(4, dtype=torch.int32)).tobytes()
    tensor = decode(body)
    tensor += 1  # writable, independent of the body
    assert tensor.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "value",
    [object(), lambda: 1, {1, 2}, torch.ones(2).to_sparse(), 2**70, torch.ones(2).to(
        torch.uint16)],
    ids=["object", "function", "set", "sparse", "bigint", "uint16"],
)
def test_values_that_cannot_travel_are_refused_at_encode_time(value: object) -> None:
    with pytest.raises(EncodeError):
        encode(value)


def test_a_pickle_is_never_decoded() -> None:
    with pytest.raises(DecodeError, match="never pickle"):
        decode(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.")


def test_replies_carry_a_value_or_an_error() -> None:
    assert decode_reply(Reply([1, 2]).encode().tobytes()).value == [1, 2]
    try:
        raise ValueError("bad value")
    except ValueError as e:
        info = ErrorInfo.from_exception(e)
    reply = decode_reply(Reply(error=info).encode().tobytes())
    assert reply.error is not None
    assert reply.error.type == "ValueError"
    assert "raise ValueError" in reply.error.traceback
    error = reply.error.to_exception("bob", "call torch.add")
    assert str(error) == "call torch.add failed on worker 'bob': ValueError: bad value"
    with pytest.raises(ProtocolError):
        decode_reply(encode({"maybe": 1}).tobytes())


def test_decoding_leaves_no_cycle_holding_the_message() -> None:
    gc.disable()  # a cycle would keep a (maybe 1 GiB) message alive until collected
    try:
        body = torch.frombuffer(bytearray(encode(torch.ones(1000)).tobytes()), dtype=torch.uint8)
        references = sys.getrefcount(body)
        tensor = decode(body)
        assert tensor.sum().item() == 1000
        del tensor
        assert sys.getrefcount(body) == references
    finally:
        gc.enable()
