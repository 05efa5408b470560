"""Concurrent expert calls of one MoE forward or backward: the k_min rule, stuck calls, rerouting.

Every token has ``k`` slots, each assigned to one expert; the tokens routed to one expert travel
in one request (a *job*), and all jobs run at once in the swarm's loop. A slot is *answered* when
its job returns a valid answer while the slot still points at that job.

When to stop waiting
--------------------
* A token is *settled* when it has ``need`` answers, or when nothing it still waits for can
  arrive. Once every token is settled the dispatch waits at most ``timeout_after_k_min`` more
  for the remaining jobs, and never past ``deadline``.
* A job is *suspected stuck* when its endpoint has made no progress -- no answer to any job of
  this dispatch -- for ``stuck_factor`` times *that endpoint's own* 95th-percentile latency for
  this method (``PeerHealth.expected``: its mean scaled by the rows the job carries, plus two
  deviations), and never before ``timeout_after_k_min``; and in any case once half the time to
  the deadline has passed without progress, so that a fallback still has the other half. An
  endpoint never measured (its first call) is judged by the halfway rule only. A suspected job no
  longer holds anybody back (its tokens may be rerouted); it keeps running in case it answers, and
  an answer from its endpoint clears the suspicion of all its jobs.
* Suspicion is not blame. A node that is merely slower than the others is judged by its own pace,
  never by the fastest peer's, and even a suspected one is only *checked*: the ``Swarm`` sends it a
  Ping (``Swarm.check_alive``, once per endpoint); a frozen or partitioned node does not answer and
  is then banned as ``stuck`` (one incident), a slow or busy one answers and is not. So a frozen
  node costs a step about ``timeout_after_k_min`` plus a short Ping, and the next steps nothing.
* Cancelled at the end: a job still running at the deadline that was never suspected bans its
  endpoint as ``deadline`` (once per endpoint and dispatch); the rest -- suspected jobs, and jobs
  cancelled only because every token already had its answers -- are ``late``: not failures.

Rerouting (forward only)
------------------------
A token left short of ``need`` whose remaining slots have all failed or are stuck gets its
unanswered slots reassigned to its next-best alive experts (a new exact search that excludes
every expert the token already tried and every endpoint currently failing), as long as time is
left; when the lookups that search needs have not answered yet (slow DHT), it tries again
shortly instead of giving the token up. Only new jobs are created; the stuck ones are not
touched, and an answer arriving later for a reassigned slot is ignored. Backward never reroutes:
gradients must come from the very experts (and endpoints) that produced the forward outputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from dmoe.client.candidates import FoundExpert
from dmoe.client.remote_call import TensorSpec
from dmoe.client.swarm import CallProgress, Swarm
from dmoe.errors import DeadlineExceeded, ExpertCallError
from dmoe.wire.proto import expert_pb2 as pb

_MAX_NAP = 0.5  # seconds: re-evaluate at least this often (a replica retry changes the endpoint tried)
_REROUTE_RETRY = 0.25  # seconds between reroute attempts while DHT lookups have not answered


@dataclass(eq=False)
class Job:
    """One request to one expert, answering the (token, slot) pairs it is assigned to."""

    index: int
    uid: str
    endpoints: tuple[str, ...]
    rows: np.ndarray  # (r,) token index of each request row
    slots: np.ndarray  # (r,) slot of that token this row answers
    request: pb.ExpertRequest
    expected: tuple[TensorSpec, ...]
    started: float = 0.0
    finished: float | None = None
    progress: CallProgress = field(default_factory=CallProgress)  # endpoint being tried, since when
    task: asyncio.Task[Any] | None = None
    endpoint: str | None = None  # the endpoint that answered
    tensors: list[torch.Tensor] | None = None
    error: ExpertCallError | None = None
    stuck: bool = False
    late: bool = False  # cancelled only because every token had enough answers (not a failure)
    same_incident: bool = False  # abandoned with its endpoint's other jobs: counted once, with the first

    @property
    def open(self) -> bool:
        return self.finished is None


class Router(Protocol):
    """What a forward dispatch needs to reroute tokens (implemented by the MoE layer)."""

    def alternatives(
        self,
        tokens: np.ndarray,
        need: Sequence[int],
        exclude: Sequence[set[tuple[int, ...]]],
        is_banned: Callable[[str], bool],
        deadline: float,
    ) -> Awaitable[tuple[list[list[FoundExpert]], bool]]:
        """Next-best experts per token, and whether the search was complete (all lookups answered)."""
        ...

    def build(self, uid: str, rows: np.ndarray) -> tuple[pb.ExpertRequest, tuple[TensorSpec, ...]]: ...


@dataclass
class DispatchStats:
    reroutes: int = 0  # tokens rerouted
    stuck: int = 0  # endpoints suspected stuck (once each, whatever the number of their jobs), then checked
    abandoned: int = 0  # jobs cancelled when the dispatch ended


class Dispatch:
    def __init__(
        self,
        swarm: Swarm,
        *,
        method: str,
        num_tokens: int,
        num_slots: int,
        need: np.ndarray,
        deadline: float,
        timeout_after_k_min: float,
        retry: bool,
        router: Router | None = None,
        detect_stuck: bool = True,
    ) -> None:
        self.swarm = swarm
        self.method = method
        self.need = need  # (N,) answers each token needs
        self.deadline = deadline
        self.timeout_after_k_min = timeout_after_k_min
        self.retry = retry
        self.router = router
        self.detect_stuck = detect_stuck
        self.jobs: list[Job] = []
        self.slot_job = np.full((num_tokens, num_slots), -1, dtype=np.int64)  # (N, k)
        self.slot_ok = np.zeros((num_tokens, num_slots), dtype=bool)  # (N, k)
        self.slot_expert: list[list[FoundExpert | None]] = [[None] * num_slots for _ in range(num_tokens)]
        self.tried: list[set[tuple[int, ...]]] = [set() for _ in range(num_tokens)]
        self.exhausted = np.zeros(num_tokens, dtype=bool)  # rerouting found nothing more
        self.suspects: set[str] = set()  # endpoints of stuck jobs: avoided when rerouting
        self.stats = DispatchStats()
        self._last_answer: dict[str, float] = {}  # endpoint -> when it last answered in this dispatch
        self._started = time.monotonic()
        self._retry_at = 0.0  # no reroute before this (after a search that could not finish its lookups)
        # incremental bookkeeping, so that a turn of the loop costs what changed, not the number of jobs
        self._open: set[int] = set()  # jobs not finished
        self._running: list[bool] = []  # per job: open and not stuck (what holds a slot live)
        self._done: list[Job] = []  # calls that ended and are not handled yet
        self._wake: asyncio.Event | None = None  # set when a call ends
        self._stuck_heap: list[tuple[float, int]] = []  # (when a job will be suspected, job index)
        self._unscheduled: set[int] = set()  # open, unsuspected jobs whose stuck time is not known yet
        self._full_scan_at = 0.0

    # ---- jobs ----

    def add_job(
        self,
        uid: str,
        endpoints: Sequence[str],
        rows: np.ndarray,
        slots: np.ndarray,
        request: pb.ExpertRequest,
        expected: tuple[TensorSpec, ...],
        *,
        assign: np.ndarray | None = None,
    ) -> Job:
        """Register a job; ``assign`` (bool per row, default all) says which rows' slots it answers."""
        job = Job(len(self.jobs), uid, tuple(endpoints), rows, slots, request, expected)
        self.jobs.append(job)
        self._open.add(job.index)
        self._running.append(True)
        self._unscheduled.add(job.index)
        chosen = slice(None) if assign is None else assign
        self.slot_job[rows[chosen], slots[chosen]] = job.index
        return job

    def add_chosen(self, experts: Sequence[Sequence[FoundExpert]], router: Router) -> None:
        """Slot s of token t goes to ``experts[t][s]``; one job per expert carries all the rows routed to it."""
        groups: dict[str, tuple[FoundExpert, list[int], list[int]]] = {}
        for row, chosen in enumerate(experts):
            for slot, expert in enumerate(chosen):
                self.assign_expert(row, slot, expert)
                entry = groups.setdefault(expert.uid, (expert, [], []))
                entry[1].append(row)
                entry[2].append(slot)
        for uid, (expert, rows, slots) in groups.items():
            rows_np = np.asarray(rows, dtype=np.int64)
            request, expected = router.build(uid, rows_np)
            self.add_job(uid, expert.endpoints, rows_np, np.asarray(slots, dtype=np.int64), request, expected)

    def assign_expert(self, token: int, slot: int, expert: FoundExpert) -> None:
        self.slot_expert[token][slot] = expert
        self.tried[token].add(expert.coords)

    def _start(self, job: Job) -> None:
        job.started = time.monotonic()
        job.task = asyncio.get_running_loop().create_task(
            self.swarm.call(job.endpoints, job.request, method=self.method, deadline=self.deadline,
                            expected=job.expected, retry=self.retry, progress=job.progress, rows=len(job.rows))
        )
        job.task.add_done_callback(functools.partial(self._ended, job))

    def _ended(self, job: Job, _task: asyncio.Task[Any]) -> None:
        self._done.append(job)
        if self._wake is not None:
            self._wake.set()

    def _finish(self, job: Job) -> None:
        assert job.task is not None
        job.finished = time.monotonic()
        self._open.discard(job.index)
        self._running[job.index] = False
        try:
            job.endpoint, job.tensors = job.task.result()
        except ExpertCallError as e:
            job.error = e
            return
        self._last_answer[job.endpoint] = job.finished
        mine = self.used(job.index)
        self.slot_ok[job.rows[mine], job.slots[mine]] = True
        if job.endpoint in self.suspects:  # it answers after all: working through a queue, not stuck
            self.suspects.discard(job.endpoint)
            for index in self._open:
                other = self.jobs[index]
                if other.stuck and other.progress.endpoint == job.endpoint:
                    other.stuck = False
                    self._running[index] = True
                    self._unscheduled.add(index)

    def used(self, index: int) -> np.ndarray:
        """Bool per request row of job ``index``: its slot is still assigned to this job."""
        job = self.jobs[index]
        return self.slot_job[job.rows, job.slots] == index

    # ---- the loop ----

    def _live(self) -> np.ndarray:
        """(N,) slots per token whose job is still running and not stuck.

        One vectorized pass over the slots (a slot belongs to the job ``slot_job`` names), not one per job:
        this runs on every answer, and a step over a large grid has hundreds of jobs.
        """
        running = np.asarray(self._running, dtype=bool)
        assigned = self.slot_job >= 0
        live = np.zeros(self.slot_job.shape, dtype=bool)
        live[assigned] = running[self.slot_job[assigned]]
        return live.sum(axis=1)

    async def run(self) -> None:
        self._started = time.monotonic()
        self._wake = asyncio.Event()
        for job in self.jobs:
            self._start(job)
        settle_at: float | None = None
        while True:
            await asyncio.sleep(0)  # let new calls start, so each shows which endpoint it tries
            next_stuck = self._mark_stuck()
            now = time.monotonic()
            if now >= self.deadline:
                break
            answers = self.slot_ok.sum(axis=1)
            live = self._live()
            waiting = np.zeros_like(self.exhausted)  # short tokens a reroute may still help
            if self.router is not None:
                hopeless = (answers < self.need) & (live == 0) & ~self.exhausted
                if hopeless.any() and now >= self._retry_at:
                    await self._reroute(np.nonzero(hopeless)[0])
                    next_stuck = self._mark_stuck()
                    live = self._live()
                waiting = (answers < self.need) & (live == 0) & ~self.exhausted
            settled = (answers >= self.need) | ((live == 0) & ~waiting)
            if not self._open and not waiting.any():
                break
            end_at = self.deadline
            if settled.all():
                settle_at = settle_at if settle_at is not None else now
                end_at = min(self.deadline, settle_at + self.timeout_after_k_min)
                if not any(self._running[i] for i in self._open):
                    break  # only stuck calls left: nobody waits for them
            else:
                settle_at = None  # a reroute re-opened some tokens
            wake = end_at if next_stuck is None else min(end_at, next_stuck)
            if waiting.any():
                wake = min(wake, self._retry_at)
            now = time.monotonic()
            if wake <= now:
                if end_at <= now:
                    break
                wake = now
            timeout = min(max(wake - now, 0.0), _MAX_NAP)
            if not self._done:
                if not self._open:
                    await asyncio.sleep(timeout)
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            done, self._done = self._done, []
            for job in done:
                if job.open:
                    self._finish(job)
        await self._cancel_open()

    def _stuck_at(self, job: Job) -> float | None:
        """When ``job`` will be suspected stuck (``time.monotonic()``); None: never.

        Its endpoint must have made no progress (no answer in this dispatch) since the attempt began
        for ``stuck_factor`` x its own p95 latency (at least ``timeout_after_k_min``), or for half the
        time left to the deadline when the endpoint was never measured.
        """
        endpoint = job.progress.endpoint
        if not self.detect_stuck or endpoint is None:
            return None
        since = max(job.progress.started, self._last_answer.get(endpoint, 0.0))
        halfway = self._started + 0.5 * (self.deadline - self._started)  # leave a fallback the other half
        health = self.swarm.health
        own = health.expected(endpoint, self.method, len(job.rows), spread=2.0)
        if own is None:
            return max(since, halfway)
        patience = max(self.timeout_after_k_min, health.options.stuck_factor * own)
        return max(since, min(halfway, since + patience))

    def _mark_stuck(self) -> float | None:
        """Mark the jobs whose time has come as stuck; returns when the next one will be (None: never).

        Each job waits in a heap under the time it was due when last computed. Its inputs only push
        that time later when it changes for itself (an answer from its endpoint, a retry elsewhere),
        so a job is recomputed when its entry comes due, and marked if it still is. What can bring a
        time *earlier* (another call improving the endpoint's latency estimate, a retry to a much
        faster replica) is caught by a scan of all open jobs every ``_MAX_NAP``. A turn of the loop
        thus costs the jobs that came due, not all jobs: a step on a large grid has hundreds.
        """
        now = time.monotonic()
        heap = self._stuck_heap
        if now >= self._full_scan_at:
            self._full_scan_at = now + _MAX_NAP
            candidates = [i for i in self._open if not self.jobs[i].stuck]
            heap.clear()
        else:
            candidates = list(self._unscheduled)
            while heap and heap[0][0] <= now:
                candidates.append(heapq.heappop(heap)[1])
        self._unscheduled = set()
        for index in candidates:
            job = self.jobs[index]
            if not job.open or job.stuck:
                continue
            stuck_at = self._stuck_at(job)
            if stuck_at is None:
                self._unscheduled.add(index)  # its call has not begun an attempt yet
            elif now < stuck_at:
                heapq.heappush(heap, (stuck_at, index))
            else:
                job.stuck = True
                self._running[index] = False
                endpoint = job.progress.endpoint
                assert endpoint is not None
                if endpoint not in self.suspects:
                    self.stats.stuck += 1  # one suspicion per endpoint, however many of its jobs
                    self.swarm.check_alive(endpoint, self.method, started=job.progress.started)
                self.suspects.add(endpoint)
        return heap[0][0] if heap else None

    async def _cancel_open(self) -> None:
        """Cancel what still runs: calls past the deadline ban their endpoint, late ones don't.

        Suspected endpoints get their verdict first (the Ping sent when they were suspected), so
        the next step does not call a frozen node again.
        """
        if self.suspects:
            await self.swarm.checked(sorted(self.suspects), timeout=min(self.swarm.health.options.probe_timeout,
                                                                         self.deadline - time.monotonic()))
            for job in self.jobs:  # answers that arrived meanwhile are answers
                if job.open and job.task is not None and job.task.done():
                    self._finish(job)
        open_jobs = [j for j in self.jobs if j.open and j.task is not None]
        for job in open_jobs:
            assert job.task is not None
            job.task.cancel()
        if open_jobs:
            await asyncio.gather(*(j.task for j in open_jobs if j.task is not None), return_exceptions=True)
        past_deadline = time.monotonic() >= self.deadline - 0.01
        penalized: set[str] = set()
        for job in open_jobs:
            job.finished = time.monotonic()
            endpoint = job.progress.endpoint
            # a suspected job is settled by the Swarm's liveness check, not here
            why = "late" if job.stuck or not past_deadline else "deadline"
            message = f"{self.method} of {job.uid} at {endpoint} abandoned ({why})"
            if why == "late" or endpoint is None:
                self.swarm.note_late(self.method)
            elif endpoint in penalized:
                job.same_incident = True  # the endpoint already answered for this dispatch
            else:
                penalized.add(endpoint)
                self.swarm.penalize(endpoint, self.method, why, message, started=job.progress.started)
            job.error = DeadlineExceeded(message, uid=job.uid, endpoint=endpoint or "")
            job.late = why == "late"
            self.stats.abandoned += 1

    async def _reroute(self, tokens: np.ndarray) -> None:
        assert self.router is not None
        free: list[list[int]] = []
        for t in tokens.tolist():
            slots = [
                s for s in range(self.slot_job.shape[1])
                if not self.slot_ok[t, s] and (self.slot_job[t, s] < 0 or not self._slot_live(t, s))
            ]
            free.append(slots)
        suspects = set(self.suspects)
        health = self.swarm.health
        alternatives, complete = await self.router.alternatives(
            tokens,
            [len(f) for f in free],
            [self.tried[t] for t in tokens.tolist()],
            lambda endpoint: endpoint in suspects or health.is_banned(endpoint),
            self.deadline,
        )
        groups: dict[str, tuple[FoundExpert, list[int], list[int]]] = {}
        for t, slots, found in zip(tokens.tolist(), free, alternatives, strict=True):
            found = [e for e in found if e.coords not in self.tried[t]]
            if not found:
                if complete:
                    self.exhausted[t] = True  # nothing else is alive
                else:  # lookups still running (slow DHT): try again shortly, they warm the cache
                    self._retry_at = time.monotonic() + _REROUTE_RETRY
                continue
            self.stats.reroutes += 1
            for slot, expert in zip(slots, found, strict=False):
                self.assign_expert(t, slot, expert)
                entry = groups.setdefault(expert.uid, (expert, [], []))
                entry[1].append(t)
                entry[2].append(slot)
        for uid, (expert, rows, slots) in groups.items():
            rows_np, slots_np = np.asarray(rows, dtype=np.int64), np.asarray(slots, dtype=np.int64)
            request, expected = self.router.build(uid, rows_np)
            job = self.add_job(uid, expert.endpoints, rows_np, slots_np, request, expected)
            self._start(job)

    def _slot_live(self, token: int, slot: int) -> bool:
        job = self.jobs[self.slot_job[token, slot]]
        return job.open and not job.stuck


@dataclass
class CallSummary:
    """What the layer records about one dispatch."""

    answered: int = 0
    late: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, dispatch: Dispatch) -> CallSummary:
        summary = cls()
        for job in dispatch.jobs:
            if job.tensors is not None:
                summary.answered += 1
            elif job.late:
                summary.late += 1
            elif job.same_incident:
                continue
            else:
                kind = job.error.kind if job.error is not None else "unknown"
                summary.failures[kind] = summary.failures.get(kind, 0) + 1
        return summary
