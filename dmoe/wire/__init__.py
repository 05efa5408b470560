"""The wire plane: how tensors and expert calls look on the network.

* ``codec``     tensors as raw bytes with dtype and shape (never repeated floats), optional lossy
                compression for home links, chunking for large payloads, gRPC channel options.
* ``proto``     code generated from ``proto/expert.proto`` (the Forward/Backward/Info service).
* ``protogen``  regenerates ``proto`` (``make proto``) and checks it is current (``make lint``).
* ``aio_status`` keeps a server's status when grpc's asyncio client is still streaming (installed here,
                on import, so every dmoe process and client has it).

Imports torch, protobuf and grpc only; every other plane builds on it.
"""

from dmoe.wire import aio_status

aio_status.install()
