"""Wire format: exact round trips, lossy compression, and errors that name the problem."""

from __future__ import annotations

import pytest
import torch

from dmoe.errors import WireFormatError
from dmoe.wire.codec import (
    CHUNK_BYTES,
    check_compression,
    deserialize_tensor,
    has_non_finite,
    iter_chunks,
    payload_bytes,
    serialize_tensor,
    serialize_tensors,
)
from dmoe.wire.proto import expert_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float64,
                                   torch.int32, torch.int8, torch.uint8, torch.bool])
def test_round_trip_is_exact(dtype):
    if dtype.is_floating_point:
        t = torch.randn(3, 5, 7).to(dtype)
        t[0, 0, 0] = float("inf")
    elif dtype == torch.bool:
        t = torch.rand(3, 5, 7) > 0.5
    else:
        t = torch.randint(-100 if dtype.is_signed else 0, 100, (3, 5, 7), dtype=dtype)
    if dtype == torch.int64:
        t[0, 0, 0] = 2**62 + 1  # not representable in float64: must survive as raw bytes
    msg = serialize_tensor(t)
    assert len(msg.data) == t.numel() * t.element_size()
    back = deserialize_tensor(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


def test_round_trip_of_views_scalars_and_empty_tensors():
    base = torch.randn(6, 8)
    for t in (base.t(), base[:, ::2], torch.tensor(3.5), torch.empty(0, 4)):
        back = deserialize_tensor(serialize_tensor(t))
        assert back.shape == t.shape and torch.equal(back, t.contiguous())


@pytest.mark.parametrize("compression", ["float16", "bfloat16"])
def test_compression_halves_bytes_and_restores_dtype(compression):
    t = torch.randn(64, 32)
    msg = serialize_tensor(t, compression)
    assert msg.wire_dtype == compression and len(msg.data) == t.numel() * 2
    back = deserialize_tensor(msg)
    assert back.dtype == torch.float32
    assert torch.equal(back, t.to(getattr(torch, compression)).float())
    ints = torch.arange(10)
    assert serialize_tensor(ints, compression).wire_dtype == "", "integer tensors are never compressed"
    half = t.half()
    assert serialize_tensor(half, "float16").wire_dtype == "", "already in the wire dtype"


@pytest.mark.parametrize(("compression", "max_error"), [("uniform8", 0.03), ("quantile8", 0.05)])
def test_eight_bit_codecs_quarter_the_bytes_and_small_tensors_stay_float16(compression, max_error):
    t = torch.randn(64, 1024)  # an activation batch: hidden 1024, 64 rows
    msg = serialize_tensor(t, compression)
    assert msg.wire_dtype == compression and len(msg.data) <= 0.3 * t.numel() * 4  # codebook + 1 byte per element
    back = deserialize_tensor(msg)
    assert back.dtype == torch.float32 and back.shape == t.shape
    assert float((back - t).norm() / t.norm()) < max_error
    bf = deserialize_tensor(serialize_tensor(t.bfloat16(), compression))
    assert bf.dtype == torch.bfloat16  # the receiver restores the sender's dtype
    small = serialize_tensor(torch.randn(2, 16), compression)  # a codebook would cost more than it saves
    assert small.wire_dtype == "float16" and len(small.data) == 2 * 16 * 2
    assert serialize_tensor(torch.arange(5000), compression).wire_dtype == "", "integers are never compressed"


def test_malformed_eight_bit_tensors_raise_wire_errors():
    good = serialize_tensor(torch.randn(64, 64), "uniform8")
    size = 256
    data = bytearray(good.data)
    data[8 + 4 * size] = 255  # still in range for a full codebook
    too_far = bytearray(good.data)
    too_far[0:8] = (16).to_bytes(8, "little")  # a 16-entry codebook, but the indices run to 255
    cases = {
        "too short": pb.Tensor(dtype="float32", shape=[64, 64], data=b"\x01", wire_dtype="uniform8"),
        "do not match": pb.Tensor(dtype="float32", shape=[64, 65], data=good.data, wire_dtype="uniform8"),
        "only allowed for float": pb.Tensor(dtype="int64", shape=[64, 64], data=good.data, wire_dtype="uniform8"),
        "more than 10": pb.Tensor(dtype="float32", shape=[64, 64], data=good.data, wire_dtype="uniform8"),
    }
    for needle, msg in cases.items():
        with pytest.raises(WireFormatError, match=needle):
            deserialize_tensor(msg, max_elements=10 if needle == "more than 10" else None)
    truncated = bytes(too_far[: 8 + 4 * 16]) + bytes(too_far[8 + 4 * size:])
    with pytest.raises(WireFormatError, match="past its codebook"):
        deserialize_tensor(pb.Tensor(dtype="float32", shape=[64, 64], data=truncated, wire_dtype="uniform8"))
    assert deserialize_tensor(pb.Tensor(dtype="float32", shape=[64, 64], data=bytes(data), wire_dtype="uniform8"
                                        )).shape == (64, 64)


def test_malformed_tensors_raise_wire_errors_naming_the_problem():
    good = serialize_tensor(torch.randn(4, 4))
    cases = {
        "unknown dtype": pb.Tensor(dtype="complex64", shape=[4, 4], data=good.data),
        "needs 64 bytes, got 61": pb.Tensor(dtype="float32", shape=[4, 4], data=good.data[:-3]),
        "negative dimension": pb.Tensor(dtype="float32", shape=[-4, -4], data=good.data),
        "only allowed for float": pb.Tensor(dtype="int64", shape=[4, 2], data=good.data, wire_dtype="float16"),
        "unknown wire dtype": pb.Tensor(dtype="float32", shape=[4, 4], data=good.data, wire_dtype="float8"),
    }
    for needle, msg in cases.items():
        with pytest.raises(WireFormatError, match=needle):
            deserialize_tensor(msg)
    with pytest.raises(WireFormatError, match="more than 10"):
        deserialize_tensor(good, max_elements=10)
    with pytest.raises(WireFormatError, match="compression"):
        check_compression("gzip")
    assert check_compression("none") == ""


def test_chunks_reassemble_and_helpers():
    payload = bytes(range(256)) * (3 * CHUNK_BYTES // 256 + 7)
    chunks = list(iter_chunks(payload))
    assert len(chunks) == 4 and all(len(c.payload) <= CHUNK_BYTES for c in chunks)
    assert b"".join(c.payload for c in chunks) == payload
    assert [c.payload for c in iter_chunks(b"")] == [b""]
    msgs = serialize_tensors([torch.zeros(2, 3), torch.zeros(5, dtype=torch.int64)])
    assert payload_bytes(msgs) == 2 * 3 * 4 + 5 * 8
    assert has_non_finite(torch.tensor([1.0, float("nan")])) and not has_non_finite(torch.tensor([1, 2]))


def test_a_streaming_asyncio_client_keeps_the_status_a_server_ends_its_call_with():
    """grpc/grpc#36066: without ``dmoe.wire.aio_status`` most of these calls end as INTERNAL ("Internal error from
    Core") instead of the server's RESOURCE_EXHAUSTED; both ways of streaming a request are covered."""
    import asyncio
    from collections import Counter

    import grpc

    import dmoe.wire  # noqa: F401  (installs the fix)

    def same(b: bytes) -> bytes:
        return b

    async def refuse(chunks, context):
        async for _ in chunks:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too big")
        yield b""

    async def main() -> Counter:
        server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(refuse, request_deserializer=same, response_serializer=same)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {"M": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        method = channel.stream_stream("/t.S/M", request_serializer=same, response_deserializer=same)
        chunk, outcomes = b"x" * 2**20, Counter()

        async def chunks():
            for _ in range(32):
                yield chunk

        for _ in range(20):
            try:
                async for _ in method(chunks(), timeout=10):
                    pass
            except grpc.aio.AioRpcError as e:
                outcomes["iterator " + e.code().name] += 1
            call = method(timeout=10)
            try:
                for _ in range(32):
                    await call.write(chunk)
            except grpc.aio.AioRpcError as e:
                outcomes["write " + e.code().name] += 1
            except asyncio.InvalidStateError:  # the call had ended before this write began: grpc's own answer
                outcomes["write " + (await call.code()).name] += 1
        await channel.close(None)
        await server.stop(None)
        return outcomes

    assert asyncio.run(main()) == Counter({"iterator RESOURCE_EXHAUSTED": 20, "write RESOURCE_EXHAUSTED": 20})
