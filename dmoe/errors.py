"""dmoe's failure kinds: one small tree, so a caller catches ``DmoeError`` and a log names the kind.

Lower-level exceptions (grpc.aio.AioRpcError, asyncio.TimeoutError, bad payloads) are mapped to
these at the client boundary by ``dmoe.client.remote_call``.
"""

from __future__ import annotations


class DmoeError(Exception):
    """Base class of every error dmoe raises on purpose."""

    kind = "error"


class ExpertCallError(DmoeError):
    """A call to one remote expert gave no usable answer."""

    kind = "call_failed"

    def __init__(self, message: str, *, uid: str = "", endpoint: str = "") -> None:
        super().__init__(message)
        self.uid = uid
        self.endpoint = endpoint


class DeadlineExceeded(ExpertCallError):
    """The expert did not answer before the call's deadline (slow, frozen or partitioned node)."""

    kind = "deadline"


class NodeUnreachable(ExpertCallError):
    """The node's endpoint refused or dropped the connection (crashed, left, wrong address)."""

    kind = "unreachable"


class RequestRejected(ExpertCallError):
    """The node answered with an error status (overloaded, unknown expert, invalid request)."""

    kind = "rejected"

    def __init__(self, message: str, *, uid: str = "", endpoint: str = "", status: str = "") -> None:
        super().__init__(message, uid=uid, endpoint=endpoint)
        self.status = status


class BadAnswer(ExpertCallError):
    """The node answered, but with garbage: wrong shape or dtype, NaN/Inf, undecodable bytes."""

    kind = "bad_answer"


class WireFormatError(DmoeError, ValueError):
    """A tensor or message on the wire cannot be decoded (names the problem)."""

    kind = "wire"


class NotEnoughExperts(DmoeError):
    """Some samples got fewer than k_min expert answers before the deadline."""

    kind = "not_enough_experts"

    def __init__(self, message: str, *, missing: list[str] | None = None, deadline: float | None = None) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.deadline = deadline


class ConfigError(DmoeError, ValueError):
    """A command-line flag, pattern or scenario value is invalid (message says which and why)."""

    kind = "config"


def clip(value: object, limit: int = 48) -> str:
    """``repr`` of at most ``limit`` characters of ``value``: what an error message may quote of a peer's input.

    A peer controls uids, dtype names and the like; echoed whole, a 100 KB uid overflows the
    caller's metadata limit and floods the node's log.
    """
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
