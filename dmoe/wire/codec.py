"""Wire format: torch tensors <-> ``dmoe.Tensor`` protobuf messages, and chunking of big payloads.

Tensors travel as raw little-endian bytes plus dtype and shape. Float tensors may be lossy
compressed for transport (``float16`` / ``bfloat16``): the bytes are then in ``wire_dtype`` and
the receiver casts back to ``dtype``. Every decode checks the header against the byte count, so
malformed input raises ``WireFormatError`` naming the problem instead of crashing a worker.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

from dmoe.config.client import COMPRESSIONS as CHOICES
from dmoe.errors import WireFormatError, clip
from dmoe.wire.proto import expert_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
COMPRESSIONS = ("", *CHOICES)  # "" is how "none" travels

# One gRPC message carries at most this much tensor payload; bigger requests/replies use the
# *Stream RPCs, cut into CHUNK_BYTES pieces. Both sides allow MAX_MESSAGE_BYTES per message.
MAX_UNARY_BYTES = 2 * 1024 * 1024
# payloads from this size on are decoded and checked in a worker thread, never on an event loop: a
# loop busy scanning megabytes looks like a stuck node to everyone it serves; below it the thread
# hop (~50 us) costs more than the work
OFF_LOOP_BYTES = 64 * 1024
CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise WireFormatError(f"dtype {dtype} cannot travel on the wire (supported: {', '.join(DTYPES)})") from None


def check_compression(compression: str) -> str:
    if compression not in COMPRESSIONS:
        raise WireFormatError(f"unknown compression {clip(compression)} (expected one of: none, float16, bfloat16)")
    return "" if compression == "none" else compression


def serialize_tensor(tensor: torch.Tensor, compression: str = "") -> pb.Tensor:
    """Encode a tensor; float tensors are cast to ``compression`` (float16/bfloat16) for transport."""
    compression = check_compression(compression)
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    name = dtype_name(tensor.dtype)
    wire = tensor
    wire_name = ""
    if compression and tensor.is_floating_point() and tensor.dtype != DTYPES[compression]:
        wire = tensor.to(DTYPES[compression])
        wire_name = compression
    data = wire.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return pb.Tensor(dtype=name, shape=list(tensor.shape), data=data, wire_dtype=wire_name)


def deserialize_tensor(msg: pb.Tensor, *, max_elements: int | None = None) -> torch.Tensor:
    """Decode a tensor, validating dtype, shape and byte count."""
    if msg.dtype not in DTYPES:
        raise WireFormatError(f"unknown dtype {clip(msg.dtype)} (supported: {', '.join(DTYPES)})")
    wire_name = msg.wire_dtype or msg.dtype
    if wire_name not in DTYPES:
        raise WireFormatError(f"unknown wire dtype {clip(msg.wire_dtype)}")
    if msg.wire_dtype and not (DTYPES[msg.dtype].is_floating_point and DTYPES[wire_name].is_floating_point):
        raise WireFormatError(f"wire dtype {clip(msg.wire_dtype)} is only allowed for float tensors, not "
                              f"{clip(msg.dtype)}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise WireFormatError(f"negative dimension in shape {list(shape)}")
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise WireFormatError(f"tensor of shape {list(shape)} has {numel} elements, more than {max_elements}")
    wire_dtype = DTYPES[wire_name]
    itemsize = torch.empty((), dtype=wire_dtype).element_size()
    if len(msg.data) != numel * itemsize:
        raise WireFormatError(
            f"tensor of shape {list(shape)} and dtype {wire_name} needs {numel * itemsize} bytes, got {len(msg.data)}"
        )
    if numel == 0:
        tensor = torch.empty(shape, dtype=wire_dtype)
    else:
        tensor = torch.frombuffer(bytearray(msg.data), dtype=wire_dtype).reshape(shape)
    if msg.wire_dtype:
        tensor = tensor.to(DTYPES[msg.dtype])
    return tensor


def serialize_tensors(tensors: Iterable[torch.Tensor], compression: str = "") -> list[pb.Tensor]:
    return [serialize_tensor(t, compression) for t in tensors]


def deserialize_tensors(msgs: Iterable[pb.Tensor], *, max_elements: int | None = None) -> list[torch.Tensor]:
    return [deserialize_tensor(m, max_elements=max_elements) for m in msgs]


def payload_bytes(tensors: Iterable[pb.Tensor]) -> int:
    return sum(len(t.data) for t in tensors)


def iter_chunks(payload: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.Chunk]:
    """Cut a serialized message into Chunk messages (at least one, even for an empty payload)."""
    if not payload:
        yield pb.Chunk(payload=b"")
        return
    view = memoryview(payload)
    for start in range(0, len(payload), chunk_bytes):
        yield pb.Chunk(payload=bytes(view[start : start + chunk_bytes]))


def has_non_finite(tensor: torch.Tensor) -> bool:
    return bool(tensor.is_floating_point() and not torch.isfinite(tensor).all())
