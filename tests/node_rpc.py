"""Test helpers that talk to a real node the way any client would: raw gRPC stubs and a DHT peer.

Deliberately independent of the library's client (``dmoe.client.remote_call``) so node tests check the
node against the wire contract itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import torch

from dmoe.dht.access import InLoopDHT
from dmoe.dht.registry import ExpertEndpoint, ExpertRegistry
from dmoe.wire.codec import (
    GRPC_OPTIONS,
    MAX_UNARY_BYTES,
    deserialize_tensors,
    iter_chunks,
    payload_bytes,
    serialize_tensors,
)
from dmoe.wire.proto import expert_pb2 as pb
from dmoe.wire.proto import expert_pb2_grpc as pb_grpc

_CHANNELS: dict[str, grpc.Channel] = {}


def stub(endpoint: str) -> pb_grpc.ExpertServiceStub:
    if endpoint not in _CHANNELS:
        _CHANNELS[endpoint] = grpc.insecure_channel(endpoint, options=GRPC_OPTIONS)
    return pb_grpc.ExpertServiceStub(_CHANNELS[endpoint])


def close_channels() -> None:
    for channel in _CHANNELS.values():
        channel.close()
    _CHANNELS.clear()


def call(endpoint: str, method: str, uid: str, tensors: Sequence[torch.Tensor], *, compression: str = "",
         timeout: float = 30.0, stream: bool | None = None) -> list[torch.Tensor]:
    """Forward/Backward through the unary RPC, or the *Stream RPC when the payload is big."""
    request = pb.ExpertRequest(uid=uid, tensors=serialize_tensors(tensors), compression=compression)
    return call_request(endpoint, method, request, timeout=timeout, stream=stream)


def call_request(endpoint: str, method: str, request: pb.ExpertRequest, *, timeout: float = 30.0,
                 stream: bool | None = None) -> list[torch.Tensor]:
    s = stub(endpoint)
    if stream is None:
        stream = payload_bytes(request.tensors) > MAX_UNARY_BYTES
    if not stream:
        reply = getattr(s, method)(request, timeout=timeout)
    else:
        chunks = getattr(s, method + "Stream")(iter_chunks(request.SerializeToString()), timeout=timeout)
        reply = pb.ExpertReply.FromString(b"".join(c.payload for c in chunks))
    return deserialize_tensors(reply.tensors)


def status_of(fn: object, *args: object, **kwargs: object) -> tuple[grpc.StatusCode, str]:
    """Run a call that must fail; return its (status code, details)."""
    try:
        fn(*args, **kwargs)  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError("call succeeded but an error status was expected")


def updates(endpoint: str, uid: str) -> int:
    return stub(endpoint).Info(pb.InfoRequest(uid=uid), timeout=10).experts[0].updates


async def _find(initial_peers: Sequence[str], uids: Sequence[str]) -> dict[str, list[ExpertEndpoint]]:
    dht = await InLoopDHT.create(initial_peers=initial_peers, client_mode=True)
    try:
        return await ExpertRegistry(dht).find_experts(list(uids))
    finally:
        await dht.shutdown()


def find_experts(initial_peers: Sequence[str], uids: Sequence[str]) -> dict[str, list[ExpertEndpoint]]:
    """Look experts up through a fresh DHT peer that joins via ``initial_peers``."""
    return asyncio.run(_find(initial_peers, uids))


def expert_weights(endpoint: str, uid: str, *, round_: int = 0) -> dict[str, torch.Tensor]:
    """An expert's current weights, read through ``GetState`` and unpacked by hand (checks the wire contract:
    a header with size and SHA-256 first, then the torch.save'd payload)."""
    import hashlib
    import io

    payload = bytearray()
    header = None
    for chunk in stub(endpoint).GetState(pb.StateRequest(uid=uid, round=round_), timeout=60):
        if header is None:
            assert chunk.HasField("header"), "the first chunk carries the header"
            header = chunk.header
        payload += chunk.payload
    assert header is not None and header.size == len(payload)
    assert hashlib.sha256(payload).hexdigest() == header.sha256
    return torch.load(io.BytesIO(bytes(payload)), weights_only=True)["module"]


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all float tensors."""
    num = sum(float((a[k].double() - v.double()).pow(2).sum()) for k, v in b.items() if v.is_floating_point())
    den = sum(float(v.double().pow(2).sum()) for v in b.values() if v.is_floating_point())
    return (num / den) ** 0.5
