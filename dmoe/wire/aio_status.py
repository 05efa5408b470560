"""A grpc asyncio client keeps the status a server sends while the client is still streaming its request.

grpc's asyncio client (``grpc.aio``, up to at least 1.85) loses that status: when a server ends a
client-streaming call early (a node refusing an oversized stream with ``RESOURCE_EXHAUSTED``, say),
the client's next write fails in Core, and ``_StreamRequestMixin._write`` then overwrites the status
the server had already delivered with ``INTERNAL: Internal error from Core`` (grpc/grpc#36066, fix
proposed in grpc/grpc#43486). For dmoe that turns "this request is too big for that node" into
"that node is broken", and a client bans a node that answers ``INTERNAL``.

``install()`` replaces that one method with a copy that, when a write fails, first waits (briefly) for
the call's own status and keeps it; only if none comes does it record the internal error as grpc
does. The wait is bounded because Core does not always deliver a status when it rejects a batch
(the hang grpc fixed with the unconditional error). It is installed once, when ``dmoe.wire`` is
imported, and only if the method has the shape it replaces; otherwise grpc is left alone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

_STATUS_WAIT_SECONDS = 2.0
_installed = False


def install() -> bool:
    """Patch ``grpc.aio``'s stream-request write (idempotent); False if this grpc does not look as expected."""
    global _installed
    if _installed:
        return True
    try:
        from grpc._cython import cygrpc
        from grpc.aio import _call
        mixin = _call._StreamRequestMixin
        serialize = _call._common.serialize
        finished, half_closed = _call._RPC_ALREADY_FINISHED_DETAILS, _call._RPC_HALF_CLOSED_DETAILS
    except (ImportError, AttributeError) as e:
        log.debug("grpc.aio stream-write status fix not installed: %s", e)
        return False
    if not hasattr(mixin, "_write"):
        return False

    async def _write(self: Any, request: Any) -> None:
        if self.done():
            raise asyncio.InvalidStateError(finished)
        if self._done_writing_flag:
            raise asyncio.InvalidStateError(half_closed)
        if not self._metadata_sent.is_set():
            await self._metadata_sent.wait()
            if self.done():
                await self._raise_for_status()
        serialized = serialize(request, self._request_serializer)
        try:
            await self._cython_call.send_serialized_message(serialized)
        except cygrpc.InternalError as err:
            try:  # the server may have ended the call already: its status is the answer
                await asyncio.wait_for(asyncio.shield(self._cython_call.status()), _STATUS_WAIT_SECONDS)
            except TimeoutError:
                self._cython_call.set_internal_error(str(err))
            await self._raise_for_status()
        except asyncio.CancelledError:
            if not self.cancelled():
                self.cancel()
            raise

    mixin._write = _write
    _installed = True
    return True
