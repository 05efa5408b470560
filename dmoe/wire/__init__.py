"""The wire plane: how tensors and expert calls look on the network.

* ``codec``     tensors as raw bytes with dtype and shape (never repeated floats), optional lossy
                compression for home links, chunking for large payloads, gRPC channel options.
* ``proto``     code generated from ``proto/expert.proto`` (the Forward/Backward/Info service).
* ``protogen``  regenerates ``proto`` (``make proto``) and checks it is current (``make lint``).

Imports torch and protobuf only; every other plane builds on it.
"""
