"""BatchScheduler: per-expert request queues, fair batching, and worker threads for compute.

Design
------
* Scheduling happens on the event loop; compute happens in a ``ThreadPoolExecutor`` with
  ``num_workers`` threads. The loop never runs torch code except cheap input checks.
* Requests are queued per ``(uid, kind, batch signature)`` (kind = forward/backward, signature =
  dtypes and trailing shapes), so one queue's requests can be concatenated along dim 0.
* Fair across peers (start-time fair queueing, by rows): each request gets a start tag,
  ``max(virtual time, the finish tag of that peer's previous request)``, and finishes ``rows``
  later; the virtual time is the tag of the request most recently started. A queue is a heap by
  tag. When a worker is free, the scheduler picks, among experts not already being computed,
  the queue whose smallest tag is smallest, and takes requests in tag order up to
  ``max_batch_size`` rows (a single larger request still runs, alone). A peer that keeps many
  rows queued thus gets its share and no more: another peer's request is tagged at the present
  virtual time and goes ahead of the flood's backlog, waiting at most for the batch in compute.
  With one peer this is first come, first served; a busy expert cannot starve a quiet one.
* No added latency for a lone client: with an idle worker a batch starts at once. Requests that
  arrive while the workers are busy pile up and form the next batch. ``max_batch_delay_ms`` > 0
  lets an idle worker wait that long for a partial batch to fill (it bounds the wait of the
  oldest request, never more).
* One expert is never computed by two workers at the same time (a forward must not read weights
  mid optimizer step, and it lets the queue grow into a bigger batch meanwhile).
* Admission: a request that would push the queued rows over ``max_queued_rows`` is refused at
  once with RESOURCE_EXHAUSTED. A request whose gRPC deadline passed while queued is dropped
  without compute (DEADLINE_EXCEEDED); a request whose client went away is skipped.
* Replies are serialized to protobuf tensors in the worker too, so big copies stay off the loop.
* If a merged batch raises, each of its requests is retried alone, so one pathological request
  fails by itself and the others still get answers.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch
from dmoe.node.activations import ActivationCache
from dmoe.node.backend import ExpertBackend
from dmoe.node.metrics import NodeMetrics
from dmoe.node.validation import RpcFailure

from dmoe.config.node import BatchingOptions
from dmoe.wire.codec import FORWARD, serialize_tensor
from dmoe.wire.proto import expert_pb2 as pb

log = logging.getLogger(__name__)



@dataclass(eq=False)
class Task:
    uid: str
    kind: str
    tensors: list[torch.Tensor]
    rows: int
    signature: tuple
    compression: str
    deadline: float | None  # loop.time() after which the caller has given up
    future: asyncio.Future
    enqueued: float = field(default=0.0)
    call_id: str = ""  # the trainer's id of this call, the same in its forward and backward
    peer: str = ""  # the caller's address: the unit of fairness
    tag: float = 0.0  # start tag of the fair queueing (see the module docstring)
    seq: int = 0  # arrival order, breaks ties between equal tags

    def __lt__(self, other: Task) -> bool:  # heap order
        return (self.tag, self.seq) < (other.tag, other.seq)


_MAX_PEERS = 65536  # finish tags kept; idle peers' are dropped first


class BatchScheduler:
    def __init__(
        self,
        backends: dict[str, ExpertBackend],
        *,
        options: BatchingOptions,
        metrics: NodeMetrics,
    ) -> None:
        self.backends = backends
        self.options = options
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=options.num_workers, thread_name_prefix="dmoe-expert")
        self.cache = ActivationCache(max_bytes=int(options.activation_cache_mb * 2**20), ttl=options.activation_cache_s)
        self.idle_workers = options.num_workers
        self.queues: dict[tuple, list[Task]] = {}  # heaps by (tag, seq)
        self.virtual_time = 0.0
        self._finish: dict[str, float] = {}  # peer -> finish tag of its latest request
        self._seq = itertools.count()
        self.busy_uids: set[str] = set()
        self.queued_rows = 0
        self.queued_requests = 0
        self.inflight_rows = 0
        self.accepting = True
        self._timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def load(self) -> float:
        """Queued plus in-flight rows, in units of max_batch_size (announced in the DHT, sent in Ping)."""
        return (self.queued_rows + self.inflight_rows) / self.options.max_batch_size

    # ---- admission ----

    def admit(self, rows: int) -> None:
        """Raise the status a request of ``rows`` rows gets if it cannot be queued now (checked before decoding)."""
        if not self.accepting:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "node is shutting down", reason="shutting_down")
        # a lone request larger than the limit is still served (--max-request-mb bounds it)
        if self.queued_rows and self.queued_rows + rows > self.options.max_queued_rows:
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queue full: {self.queued_rows} rows queued, +{rows} would exceed --max-queued-rows "
                f"{self.options.max_queued_rows}",
                reason="queue_full",
            )

    async def submit(
        self, uid: str, kind: str, tensors: list[torch.Tensor], *, rows: int, signature: tuple,
        compression: str, timeout: float | None, call_id: str = "", peer: str = "",
    ) -> list[pb.Tensor]:
        """Queue one validated request of ``peer`` and wait for its serialized reply tensors."""
        loop = self._loop = asyncio.get_running_loop()
        self.admit(rows)  # again: the queue may have grown while this request was decoded
        now = loop.time()
        task = Task(
            uid=uid, kind=kind, tensors=tensors, rows=rows, signature=signature, compression=compression,
            deadline=None if timeout is None else now + timeout, future=loop.create_future(), enqueued=now,
            call_id=call_id, peer=peer, tag=self._tag(peer, rows), seq=next(self._seq),
        )
        heapq.heappush(self.queues.setdefault((uid, kind, signature), []), task)
        self._count(+1, rows)
        self._dispatch()
        return await task.future

    def _tag(self, peer: str, rows: int) -> float:
        if len(self._finish) >= _MAX_PEERS and peer not in self._finish:
            # a flood of addresses: forget the idle ones (their tags are behind the virtual time anyway)
            self._finish = {p: f for p, f in self._finish.items() if f > self.virtual_time}
            if len(self._finish) >= _MAX_PEERS:
                self._finish.clear()
        start = max(self.virtual_time, self._finish.get(peer, 0.0))
        self._finish[peer] = start + max(rows, 1)
        return start

    def _count(self, requests: int, rows: int) -> None:
        self.queued_requests += requests
        self.queued_rows += rows
        self.metrics.queued_rows.set(self.queued_rows)
        self.metrics.queued_requests.set(self.queued_requests)
        if self.queued_requests == 0 and self.inflight_rows == 0:
            self._idle.set()
        else:
            self._idle.clear()

    # ---- scheduling ----

    def _prune(self, queue: list[Task], now: float) -> None:
        """Drop cancelled requests and requests past their deadline from the head of a queue."""
        while queue:
            task = queue[0]
            if task.future.done():  # the client went away (cancelled, usually by its deadline)
                heapq.heappop(queue)
                self._count(-1, -task.rows)
                if task.deadline is not None and now >= task.deadline:
                    self.metrics.rejections.labels("deadline").inc()
            elif task.deadline is not None and now >= task.deadline:
                heapq.heappop(queue)
                self._count(-1, -task.rows)
                self.metrics.rejections.labels("deadline").inc()
                task.future.set_exception(
                    RpcFailure(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"deadline passed after {now - task.enqueued:.3f}s in the queue; dropped without compute",
                        reason="deadline",
                    )
                )
            else:
                return

    def _dispatch(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        delay = self.options.max_batch_delay_ms / 1000.0
        while self.idle_workers > 0:
            now = loop.time()
            best_key, best_head, wake_at = None, None, float("inf")
            for key, queue in list(self.queues.items()):
                self._prune(queue, now)
                if not queue:
                    del self.queues[key]
                    continue
                if key[0] in self.busy_uids:
                    continue
                head = queue[0]
                oldest = min(t.enqueued for t in queue) if delay > 0 else 0.0
                if delay > 0 and now < oldest + delay and sum(t.rows for t in queue) < self.options.max_batch_size:
                    wake_at = min(wake_at, oldest + delay)
                    continue
                if best_head is None or head < best_head:
                    best_key, best_head = key, head
            if best_key is None:
                if wake_at < float("inf"):
                    self._timer = loop.call_at(wake_at, self._dispatch)
                return
            self._start_batch(best_key)

    def _start_batch(self, key: tuple) -> None:
        queue = self.queues[key]
        batch: list[Task] = []
        rows = 0
        while queue and (not batch or rows + queue[0].rows <= self.options.max_batch_size):
            task = heapq.heappop(queue)
            self._count(-1, -task.rows)
            if task.future.done():
                continue
            batch.append(task)
            rows += task.rows
            self.virtual_time = max(self.virtual_time, task.tag)
        if not queue:
            del self.queues[key]
        if not batch:
            return
        uid, kind, _ = key
        backend = self.backends.get(uid)
        if backend is None:  # the node gave this expert up (dmoe.node.keeper) while these waited
            for task in batch:
                task.future.set_exception(RpcFailure(grpc.StatusCode.NOT_FOUND,
                                                     f"expert {uid} is no longer served by this node",
                                                     reason="unknown_uid"))
            return
        now = self._loop.time()
        for task in batch:
            self.metrics.queue_wait.labels(kind).observe(now - task.enqueued)
        self.idle_workers -= 1
        self.busy_uids.add(uid)
        self.inflight_rows += rows
        self._idle.clear()
        fut = self._loop.run_in_executor(self.executor, _run_batch, backend, kind, batch, self.metrics,
                                         self.cache if self.cache.enabled else None)
        fut.add_done_callback(lambda f: self._finish_batch(uid, kind, batch, rows, f))

    def _finish_batch(self, uid: str, kind: str, batch: list[Task], rows: int, fut: asyncio.Future) -> None:
        self.idle_workers += 1
        self.busy_uids.discard(uid)
        self.inflight_rows -= rows
        results = fut.result()  # _run_batch never raises: per-task results or exceptions
        for task, result in zip(batch, results, strict=True):
            if task.future.done():
                continue
            if isinstance(result, BaseException):
                task.future.set_exception(result)
            else:
                task.future.set_result(result)
        self._count(0, 0)
        self._dispatch()

    # ---- shutdown ----

    def stop_accepting(self) -> None:
        self.accepting = False

    async def drain(self) -> None:
        """Wait until every queued and in-flight request is answered."""
        await self._idle.wait()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.executor.shutdown(wait=True)


def _run_batch(
    backend: ExpertBackend, kind: str, batch: list[Task], metrics: NodeMetrics, cache: ActivationCache | None,
) -> list[list[pb.Tensor] | BaseException]:
    """Worker thread: compute one merged batch; on failure retry each request alone."""
    try:
        return _compute(backend, kind, batch, metrics, cache)
    except Exception as e:
        if len(batch) == 1:
            return [_as_failure(backend, e)]
    results: list[list[pb.Tensor] | BaseException] = []
    for task in batch:
        try:
            results.extend(_compute(backend, kind, [task], metrics, cache))
        except Exception as e:
            results.append(_as_failure(backend, e))
    return results


def _as_failure(backend: ExpertBackend, error: Exception) -> RpcFailure:
    log.warning("expert %s failed: %s: %s", backend.uid, type(error).__name__, error)
    return RpcFailure(grpc.StatusCode.INTERNAL, f"expert {backend.uid} failed: {type(error).__name__}: {error}",
                      reason="compute_error")


def _compute(
    backend: ExpertBackend, kind: str, batch: list[Task], metrics: NodeMetrics, cache: ActivationCache | None,
) -> list[list[pb.Tensor] | BaseException]:
    start = time.perf_counter()
    sizes = [task.rows for task in batch]
    if kind == FORWARD:
        n = len(batch[0].tensors)
        merged = batch[0].tensors if len(batch) == 1 else [torch.cat([t.tensors[i] for t in batch]) for i in range(n)]
        if cache is not None and all(t.call_id for t in batch):  # a trainer's calls: keep the graph for backward
            bounds = [0, *itertools.accumulate(sizes)]
            calls = {t.call_id: (bounds[i], bounds[i + 1]) for i, t in enumerate(batch)}
            outputs = backend.forward_kept(merged, calls, cache)
            metrics.kept_bytes.set(cache.bytes)
        else:
            outputs = backend.forward(merged)
    else:
        hits = cache.hits if cache is not None else 0
        outputs = backend.backward_calls([t.tensors for t in batch], [t.call_id for t in batch], cache)
        metrics.updates.labels(backend.uid).inc()
        if cache is not None:
            served = cache.hits - hits
            metrics.kept_calls.labels("hit").inc(served)
            metrics.kept_calls.labels("miss").inc(len(batch) - served)
            metrics.kept_bytes.set(cache.bytes)
    per_task: list[list[pb.Tensor] | BaseException] = [[] for _ in batch]
    for out in outputs:
        if out.dim() == 0 or out.shape[0] != sum(sizes):
            raise ValueError(f"expert output of shape {list(out.shape)} has no batch dimension of {sum(sizes)} rows")
        for i, piece in enumerate(out.split(sizes) if len(batch) > 1 else (out,)):
            answer = per_task[i]
            if isinstance(answer, BaseException):
                continue
            if piece.is_floating_point() and not bool(torch.isfinite(piece).all()):
                # a broken expert, or finite inputs that overflow it (3e38 x a weight): never hand out NaN/Inf
                # as an answer. INTERNAL, not INVALID_ARGUMENT: the node cannot tell which, and a caller bans
                # a node that answers INTERNAL (another replica may do better), never one that blames it
                what = "outputs" if kind == FORWARD else "input gradients"
                per_task[i] = RpcFailure(grpc.StatusCode.INTERNAL,
                                         f"expert {backend.uid}: its {what} for this request are not finite",
                                         reason="non_finite_output")
                continue
            answer.append(serialize_tensor(piece, batch[i].compression))
    metrics.compute.labels(kind).observe(time.perf_counter() - start)
    metrics.batch_rows.labels(kind).observe(sum(sizes))
    metrics.batch_requests.labels(kind).observe(len(batch))
    return per_task
