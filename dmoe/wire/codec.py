"""Wire format: torch tensors <-> ``dmoe.Tensor`` protobuf messages, and chunking of big payloads.

Tensors travel as raw little-endian bytes plus dtype and shape. Float tensors may be lossy
compressed for transport: cast (``float16`` / ``bfloat16``: the bytes are then in ``wire_dtype``
and the receiver casts back to ``dtype``), or quantized to 8 bits by hivemind's ``compression``
module (``uniform8`` / ``quantile8``: ``wire_dtype`` names the codec and the bytes are hivemind's
buffer, an int64 codebook size, the float32 codebook, one uint8 index per element). A codebook
costs ~1 KB, so a tensor of fewer than ``MIN_8BIT_ELEMENTS`` elements travels as float16 instead
(the wire stays self-describing: ``wire_dtype`` says which). Every decode checks the header against
the byte count (and, for 8 bits, the codebook size and every index), so malformed input raises
``WireFormatError`` naming the problem instead of crashing a worker.
"""

from __future__ import annotations

import functools
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
EIGHT_BIT = ("uniform8", "quantile8")  # hivemind codecs by dmoe name (see _codec)
MIN_8BIT_ELEMENTS = 2048  # below this an 8-bit codebook (1 KB) saves less than float16 does

# One gRPC message carries at most this much tensor payload; bigger requests/replies use the
# *Stream RPCs, cut into CHUNK_BYTES pieces. Both sides allow MAX_MESSAGE_BYTES per message.
# the two kinds of expert call (Forward / Backward and their Stream and Batch variants), for client and node alike
FORWARD = "forward"
BACKWARD = "backward"
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
        raise WireFormatError(f"unknown compression {clip(compression)} (expected one of: {', '.join(CHOICES)})")
    return "" if compression == "none" else compression


@functools.cache
def warm_up(compression: str) -> None:
    """Encode one small tensor with an 8-bit codec: its first use in a process costs ~0.6 s (torch and numpy
    set-up), which must not land on a call with a deadline. A no-op for the other modes."""
    if compression in EIGHT_BIT:
        _quantize(torch.zeros(MIN_8BIT_ELEMENTS), compression)


def _codec(name: str) -> int:
    from hivemind.proto import runtime_pb2

    return {"uniform8": runtime_pb2.CompressionType.UNIFORM_8BIT,
            "quantile8": runtime_pb2.CompressionType.QUANTILE_8BIT}[name]


def _quantize(tensor: torch.Tensor, name: str) -> bytes:
    import warnings

    from hivemind.compression import serialize_torch_tensor

    with warnings.catch_warnings():  # torch deprecates quantize_per_tensor, which hivemind's uniform8 uses
        warnings.simplefilter("ignore", UserWarning)
        return serialize_torch_tensor(tensor.float().contiguous(), _codec(name)).buffer


def _dequantize(data: bytes, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """float32 tensor from hivemind's 8-bit buffer, after checking every length and index.

    Decoded here rather than by hivemind's ``Quantization.extract``, which fails under numpy 2 (``int()`` of a
    one-element array) and trusts the buffer: the format is three fields, and every one is checked first."""
    import numpy as np

    numel = math.prod(shape)
    if len(data) < 8:
        raise WireFormatError(f"{name} tensor: {len(data)} bytes is too short for a codebook")
    size = int(np.frombuffer(data, dtype=np.int64, count=1)[0])
    if not 0 < size <= 256 or len(data) != 8 + 4 * size + numel:
        raise WireFormatError(f"{name} tensor of shape {list(shape)}: codebook of {size} entries and {len(data)} bytes "
                              f"do not match (need 8 + 4 x codebook + {numel})")
    if numel and int(np.frombuffer(data, dtype=np.uint8, offset=8 + 4 * size).max()) >= size:
        raise WireFormatError(f"{name} tensor: an index points past its codebook of {size}")
    codebook = torch.from_numpy(np.frombuffer(data, dtype=np.float32, count=size, offset=8).copy())
    indices = torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=8 + 4 * size).astype(np.int64))
    return codebook[indices].reshape(shape)


def serialize_tensor(tensor: torch.Tensor, compression: str = "") -> pb.Tensor:
    """Encode a tensor; float tensors are cast to ``compression`` (float16/bfloat16) for transport."""
    compression = check_compression(compression)
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    name = dtype_name(tensor.dtype)
    wire = tensor
    wire_name = ""
    if compression in EIGHT_BIT and tensor.is_floating_point():
        if tensor.numel() >= MIN_8BIT_ELEMENTS:
            return pb.Tensor(dtype=name, shape=list(tensor.shape), data=_quantize(tensor, compression),
                             wire_dtype=compression)
        compression = "float16"  # too small for a codebook to pay off
    if compression and compression not in EIGHT_BIT and tensor.is_floating_point() \
            and tensor.dtype != DTYPES[compression]:
        wire = tensor.to(DTYPES[compression])
        wire_name = compression
    data = wire.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return pb.Tensor(dtype=name, shape=list(tensor.shape), data=data, wire_dtype=wire_name)


def deserialize_tensor(msg: pb.Tensor, *, max_elements: int | None = None) -> torch.Tensor:
    """Decode a tensor, validating dtype, shape and byte count."""
    if msg.dtype not in DTYPES:
        raise WireFormatError(f"unknown dtype {clip(msg.dtype)} (supported: {', '.join(DTYPES)})")
    wire_name = msg.wire_dtype or msg.dtype
    if wire_name in EIGHT_BIT:
        if not DTYPES[msg.dtype].is_floating_point:
            raise WireFormatError(f"wire dtype {wire_name} is only allowed for float tensors, not {clip(msg.dtype)}")
        shape = tuple(msg.shape)
        if any(d < 0 for d in shape):
            raise WireFormatError(f"negative dimension in shape {list(shape)}")
        if max_elements is not None and math.prod(shape) > max_elements:
            raise WireFormatError(f"tensor of shape {list(shape)} has more than {max_elements} elements")
        return _dequantize(msg.data, shape, wire_name).to(DTYPES[msg.dtype])
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
