"""How a node talks to other nodes: fetching an expert's state, asking a node to adopt an expert.

Endpoints come from the DHT (``ExpertRegistry``), so they are dialed exactly as a trainer dials them:
direct or through their relay, TLS endpoints pinned to the certificate their owner published
(``dmoe.wire.endpoints.open_channel``), and in a closed swarm every call signed with this node's member key
(a node never accepts state from, or hands state to, a peer the swarm's authority did not admit).

``fetch_state`` reads the ``GetState`` stream into memory only up to the size our own copy of the expert
allows, then hands the bytes to ``dmoe.node.state.check_state``; a peer that stalls is cut off by the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import torch
from dmoe.node.state import ExpertState, StateError, check_state, max_state_bytes

from dmoe.dht.registry import ExpertRegistry
from dmoe.membership import Member, payload_digest
from dmoe.wire.endpoints import open_channel, parse_endpoint
from dmoe.wire.proto import expert_pb2 as pb
from dmoe.wire.proto import expert_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
_FETCHES = 2  # states downloaded at once (each is a copy of an expert in memory; holders serve 2 at once too)
_BUSY_RETRY = 0.5  # seconds before asking a busy holder again
GET_STATE = "GetState"  # method names a member signs (dmoe.membership.Member.metadata)
ADOPT = "Adopt"


class _Busy(Exception):
    """The holder is sending its maximum of states already (RESOURCE_EXHAUSTED): ask again shortly."""


class PeerClient:
    def __init__(self, registry: ExpertRegistry, *, member: Member | None = None, own_endpoint: str = "") -> None:
        self.registry = registry
        self.member = member
        self.own_endpoint = own_endpoint
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._fetches = asyncio.Semaphore(_FETCHES)

    async def stub(self, endpoint: str) -> pb_grpc.ExpertServiceStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            tls = parse_endpoint(endpoint).tls
            certificate = await self.registry.find_certificate(tls) if tls else None
            if tls and certificate is None:
                raise StateError(f"no certificate published for {endpoint[:80]}")
            channel = self._channels[endpoint] = open_channel(endpoint, certificate=certificate)
        return pb_grpc.ExpertServiceStub(channel)

    def _metadata(self, method: str, uid: str) -> tuple[tuple[str, str], ...] | None:
        return self.member.metadata(method, uid, payload_digest([])) if self.member is not None else None

    async def updates_of(self, endpoint: str, uid: str, *, timeout: float = 5.0) -> int | None:
        """The update counter of ``uid`` on ``endpoint`` (its lineage), or None when it does not answer."""
        try:
            stub = await self.stub(endpoint)
            reply = await stub.Info(pb.InfoRequest(uid=uid), timeout=timeout)
        except (grpc.RpcError, StateError, ValueError, OSError):
            return None
        return int(reply.experts[0].updates) if reply.experts else None

    async def fetch_state(self, endpoint: str, uid: str, *, module: torch.nn.Module,
                          optimizer: torch.optim.Optimizer, round_: int = 0, timeout: float = 60.0) -> ExpertState:
        """Download and check ``uid``'s state (``round_`` 0: current; R: its snapshot of sync round R).

        A holder busy sending other states (``RESOURCE_EXHAUSTED``) is asked again until ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._fetches:
            while True:
                try:
                    return await self._fetch_once(endpoint, uid, module=module, optimizer=optimizer, round_=round_,
                                                  timeout=max(0.1, deadline - loop.time()))
                except _Busy:
                    if deadline - loop.time() < _BUSY_RETRY:
                        raise StateError(f"{endpoint[:80]}: busy sending other states until our deadline") from None
                    await asyncio.sleep(_BUSY_RETRY)

    async def _fetch_once(self, endpoint: str, uid: str, *, module: torch.nn.Module,
                          optimizer: torch.optim.Optimizer, round_: int, timeout: float) -> ExpertState:
        stub = await self.stub(endpoint)
        limit = max_state_bytes(module)
        call = stub.GetState(pb.StateRequest(uid=uid, round=round_), timeout=timeout,
                             metadata=self._metadata(GET_STATE, uid))
        header: pb.StateHeader | None = None
        payload = bytearray()
        try:
            async for chunk in call:
                if header is None:
                    if not chunk.HasField("header"):
                        raise StateError("state stream without a header")
                    header = chunk.header
                    if header.uid != uid or header.size > limit or header.size < 0:
                        raise StateError(f"header for {header.uid[:80]!r} of {header.size} bytes "
                                         f"(expected {uid}, at most {limit})")
                payload += chunk.payload
                if len(payload) > header.size:
                    raise StateError(f"stream longer than its announced {header.size} bytes")
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise _Busy() from None
            raise StateError(f"{endpoint[:80]}: {e.code().name}: {e.details()}") from None
        finally:
            call.cancel()
        if header is None:
            raise StateError(f"{endpoint[:80]} sent no state")
        state = await asyncio.to_thread(check_state, bytes(payload), size=header.size, sha256=header.sha256,
                                        module=module, optimizer=optimizer)
        state.weight = header.weight
        state.updates = max(state.updates, int(header.updates))
        return state

    async def ask_adopt(self, endpoint: str, uid: str, *, timeout: float) -> tuple[bool, str]:
        """Ask the node at ``endpoint`` to take over ``uid`` from us; (accepted, its explanation)."""
        try:
            stub = await self.stub(endpoint)
            reply = await stub.Adopt(pb.AdoptRequest(uid=uid, source=self.own_endpoint), timeout=timeout,
                                     metadata=self._metadata(ADOPT, uid))
        except grpc.RpcError as e:
            return False, f"{e.code().name}: {e.details()}"
        except (StateError, ValueError, OSError) as e:
            return False, str(e)
        return reply.accepted, reply.detail

    async def close(self) -> None:
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()
