"""Run a scenario as a swarm of real processes on this machine and record what training did.

``Simulation`` executes the ``Timeline`` that ``ChurnModel`` derives from a ``Scenario``:

1. **Bootstrap.** A ``dmoe coordinator`` (or, without one, a bootstrap ``dmoe node`` serving a
   single expert nobody trains with) gives the swarm its first DHT address.
2. **Nodes behind links.** For every node a ``LinkEmulator`` starts first, on a free port; the node
   is launched with ``--announce-port`` = that port, so trainers reach it only through its link.
   When the node prints ``dmoe-ready`` (with its real gRPC port) the proxy is pointed there. The
   proxy port is the node's stable public address across restarts; while the node is down the
   proxy resets connections, as a home router with nothing behind the port would.
3. **Trainers** start once every node serves; the clock of the timeline (t = 0) starts when all
   trainers are ready, and the run lasts ``duration_s`` (or until every trainer reached
   ``trainer.steps``).
4. **Events** are applied at their time with real signals through ``DmoeProcess``: crash =
   SIGKILL, leave = SIGTERM (graceful), freeze = SIGSTOP of the node and of its helpers in other
   process groups (hivemind's p2pd), resume = SIGCONT, rejoin = start again
   (after deleting the checkpoint directory when the node "lost" it); partitions and link
   changes act on the node's proxy. Events of one node run in order (a per-node lock); events of
   different nodes never wait for each other (a node's slow start does not delay another's crash).
5. **Shutdown** always runs (normal end, exception, Ctrl-C/SIGTERM): trainers first (they save
   and log a final record), then nodes, bootstrap, proxies. A small *reaper* process watches a
   pipe from the simulator and, should the simulator itself die (even by SIGKILL), resumes and
   kills every process group still registered, so frozen children cannot linger either.

All blocking process operations run in worker threads; processes are *started* from the main
thread only, because the launcher's parent-death signal is tied to the thread that forks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dmoe.config.sim import SimulationOptions
from dmoe.sim.churn import ChurnEvent, ChurnModel, Timeline
from dmoe.sim.cpu_budget import CpuBudgets, StealMeter
from dmoe.sim.launcher import DmoeProcess, ProcessFailed
from dmoe.sim.links import LinkEmulator, LinkModel
from dmoe.sim.report import swarm_lineage, swarm_replication, write_report
from dmoe.sim.scenario import Scenario, dump_json_safe, load_scenario
from dmoe.sim.swarm_layout import behind_nat, node_args, node_experts, reachability_args, trainer_args

logger = logging.getLogger("dmoe.simulate")

DEMO_SCENARIO = Path(__file__).with_name("demo.toml")  # `dmoe simulate` without a scenario file


def builtin_scenario() -> Scenario:
    return load_scenario(DEMO_SCENARIO)


def coordinator_available() -> bool:
    return importlib.util.find_spec("dmoe.coordinator.cli") is not None


@dataclass
class _Node:
    index: int
    proc: DmoeProcess
    link: LinkEmulator
    checkpoint_dir: Path
    experts: list[str]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    grpc: str | None = None
    announced: str | None = None  # what it announced last: its link's address, or its relayed endpoint
    watched_helpers: list[int] = field(default_factory=list)  # frozen helpers in sessions of their own (reaper)


class Reaper:
    """A watchdog process: kills registered process groups if the simulator dies without cleaning up.

    The simulator holds the write end of the reaper's stdin; EOF (the simulator exited, however)
    makes the reaper SIGCONT + SIGTERM every group still registered, then SIGKILL after a grace period.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "dmoe.sim.simulate", "--reaper"],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True)
        self._stdin: IO[bytes] = self.proc.stdin  # type: ignore[assignment]

    def _send(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stdin.write((line + "\n").encode())
            self._stdin.flush()

    def watch(self, pid: int) -> None:
        self._send(f"+{pid}")

    def forget(self, pid: int) -> None:
        self._send(f"-{pid}")

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(15)


def _reaper_main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only EOF on stdin ends us: the simulator is gone
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line.startswith("+") and line[1:].isdigit():
            groups.add(int(line[1:]))
        elif line.startswith("-") and line[1:].isdigit():
            groups.discard(int(line[1:]))

    def alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    for pgid in groups:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(alive(g) for g in groups):
        time.sleep(0.1)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    return 0


class Simulation:
    def __init__(self, scenario: Scenario, options: SimulationOptions) -> None:
        self.scenario = scenario
        self.options = options
        self.seed = scenario.seed if options.seed is None else options.seed
        self.timeline: Timeline = ChurnModel(scenario, self.seed).timeline()
        self.out = Path(options.out_dir)
        self.nodes: list[_Node] = []
        self.trainers: list[DmoeProcess] = []
        self.bootstrap: DmoeProcess | None = None
        self.bootstrap_kind = ""
        self.http: str | None = None
        self.initial_peers: list[str] = []
        self.reaper: Reaper | None = None
        self.budgets: CpuBudgets | None = None  # [node] cpu_cores: each node's hard CPU quota (cgroups)
        self._steal = StealMeter()  # is the machine itself short of CPU (a VM's host taking it back)?
        self.t0_mono = 0.0
        self.t0_wall = 0.0
        self.started = False
        self.stopped_by = "duration"
        self._events_file: IO[str] | None = None
        self._swarm_file: IO[str] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._interrupts = 0
        self._shutting_down = False
        self._main: asyncio.Task[Any] | None = None
        self._exited_reported: set[str] = set()

    # ----- bookkeeping ----------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0_mono if self.started else 0.0

    def record(self, **fields: Any) -> None:
        rec = {"t": round(self.now(), 3), "wall": round(time.time(), 3), **fields}
        if self._events_file is not None:
            self._events_file.write(json.dumps(rec, sort_keys=True) + "\n")
            self._events_file.flush()

    def _child_env(self) -> dict[str, str]:
        return {"DMOE_LOG_LEVEL": "INFO", **self.options.env}

    def _launch(self, proc: DmoeProcess) -> DmoeProcess:
        self._exited_reported.discard(proc.name)
        proc.start()
        cores = self.scenario.node.cpu_cores
        if self.budgets is not None and cores is not None and proc.name.startswith("node"):
            self.budgets.limit(proc.name, proc.pid, cores)  # before it spawns its p2p daemon: that shares it
        if self.reaper is not None:
            self.reaper.watch(proc.pid)
        self._note_process(proc.name, proc.pid)
        return proc

    def _note_process(self, name: str, pid: int) -> None:
        """processes.jsonl: every process this run started (each is its own process group)."""
        with open(self.out / "processes.jsonl", "a") as f:
            f.write(json.dumps({"name": name, "pid": pid, "t": round(self.now(), 3)}) + "\n")

    def _write_run(self, **extra: Any) -> None:
        sc = self.scenario
        run = {
            "scenario": dump_json_safe(sc),
            "seed": self.seed,
            "t0": self.t0_wall,
            "duration_s": sc.duration_s,
            "min_experts": sc.min_experts,
            "experts_per_layer": sc.swarm.experts_per_layer,
            "grid": list(sc.swarm.grid),
            "bootstrap": self.bootstrap_kind,
            "nodes": [{"index": n.index, "experts": n.experts, "link": self.timeline.links[n.index].to_dict(),
                       "proxy": n.link.address, "behind_nat": behind_nat(sc.with_seed(self.seed), n.index),
                       "announced": n.announced} for n in self.nodes],
            "planned_events": [e.to_dict() for e in self.timeline.events],
            "cpu_budget": {"node_cores": sc.node.cpu_cores,
                           "enforced": self.budgets is not None and self.budgets.enforced,
                           "cgroup": self.budgets.version if self.budgets is not None else None,
                           "why_not": self.budgets.why_not if self.budgets is not None else None},
            "cpus": os.cpu_count(),
            "skipped_events": list(self.timeline.skipped),
            **extra,
        }
        (self.out / "run.json").write_text(json.dumps(run, indent=2, default=str) + "\n")

    # ----- the run --------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any] | None:
        """Run the whole simulation; returns the summary (None when no report could be built)."""
        self.out.mkdir(parents=True, exist_ok=True)
        for sub in ("logs", "trainers", "checkpoints"):
            (self.out / sub).mkdir(exist_ok=True)
        for name in ("events.jsonl", "swarm.jsonl", "processes.jsonl"):
            (self.out / name).unlink(missing_ok=True)
        for stale in (self.out / "trainers").glob("*.jsonl"):
            stale.unlink()
        self._events_file = open(self.out / "events.jsonl", "a")  # noqa: SIM115 - closed in finally
        self._swarm_file = open(self.out / "swarm.jsonl", "a")  # noqa: SIM115
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        error: BaseException | None = None
        elapsed = 0.0
        # process operations block in worker threads (waiting for ready lines, graceful stops): enough
        # workers that a slow start never delays a stop
        workers = min(256, 4 * (self.scenario.swarm.nodes + self.scenario.swarm.trainers) + 16)
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="simulate"))
        self.reaper = Reaper()
        self._note_process("reaper", self.reaper.proc.pid)
        if self.scenario.node.cpu_cores is not None:
            self.budgets = CpuBudgets()
            if not self.budgets.available:
                logger.warning("[node] cpu_cores = %g is NOT enforced: %s; nodes share the machine's CPUs",
                               self.scenario.node.cpu_cores, self.budgets.why_not)
        try:
            await self._start_swarm()
            await self._play()
        except asyncio.CancelledError:
            if self._main is not None:
                self._main.uncancel()
            self.stopped_by = "interrupted"
        except Exception as e:
            error = e
            self.stopped_by = f"error: {type(e).__name__}"
        finally:
            self._shutting_down = True
            elapsed = self.now()
            await self._shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            self.reaper.close()
            throttled = self.budgets.throttled_s() if self.budgets is not None else {}
            if self.budgets is not None:
                self.budgets.close()
            for f in (self._events_file, self._swarm_file):
                if f is not None:
                    f.close()
        if not self.started:  # nothing ran: no report to write
            if error is not None:
                raise error
            return None
        self._write_run(elapsed_s=elapsed, stopped_by=self.stopped_by, trainer_exit_codes=[
            t.proc.returncode if t.proc else None for t in self.trainers], cpu_throttled_s=throttled)
        if error is not None:
            logger.error("simulation stopped by %s: %s", type(error).__name__, error)
        summary = await asyncio.to_thread(write_report, self.out, plot_png=self.options.plot)
        if error is not None:
            raise error
        return summary

    def _on_signal(self, sig: int) -> None:
        self._interrupts += 1
        if not self._shutting_down and self._main is not None:
            logger.warning("received %s: stopping the swarm and writing the report", signal.Signals(sig).name)
            self._main.cancel()
            return
        if self._interrupts > 1:
            logger.warning("received %s again: killing every process now", signal.Signals(sig).name)
            for proc in self._all_procs():
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGKILL)

    def _all_procs(self) -> list[DmoeProcess]:
        return [*self.trainers, *(n.proc for n in self.nodes), *([self.bootstrap] if self.bootstrap else [])]

    async def _start_swarm(self) -> None:
        sc, opts = self.scenario, self.options
        logs = self.out / "logs"
        timeout = opts.startup_timeout_s
        use_coordinator = sc.swarm.bootstrap == "coordinator" or (
            sc.swarm.bootstrap == "auto" and coordinator_available())
        if use_coordinator:
            self.bootstrap_kind = "coordinator"
            self.bootstrap = DmoeProcess("coordinator", [
                "--identity", self.out / "coordinator.key", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                "--http-host", "127.0.0.1", "--http-port", "0", "--peers-file", "none",
                "--relay-host", "127.0.0.1", "--relay-port", "0",
                "--refresh-period", str(min(3.0, sc.node.announce_ttl_s / 2)),
            ], name="coordinator", log_path=logs / "coordinator.log", env=self._child_env())
        else:
            self.bootstrap_kind = "node"
            self.bootstrap = DmoeProcess("node", [  # it relays for the nodes behind NAT, if any
                "--experts", "bootstrap.0", "--hidden-dim", "8", "--host", "127.0.0.1", "--port", "0",
                "--reachability", "direct", "--relay",
                "--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0", "--announce-ttl", str(sc.node.announce_ttl_s),
            ], name="bootstrap", log_path=logs / "bootstrap.log", env=self._child_env())
        self._launch(self.bootstrap)
        ready = await asyncio.to_thread(self.bootstrap.wait_ready, timeout)
        self.initial_peers = list(ready.get("dht") or [])
        self.http = ready.get("http")
        if not self.initial_peers:
            raise ProcessFailed(f"{self.bootstrap.name} printed no DHT address: {ready}")
        logger.info("bootstrap %s ready at %s", self.bootstrap_kind, self.initial_peers[0])

        for i in range(sc.swarm.total_nodes):
            link = LinkEmulator(self.timeline.links[i], seed=self.seed * 10_007 + i, name=f"link{i}")
            await link.start()
            ckpt = self.out / "checkpoints" / f"node{i}"
            seeded = sc.with_seed(self.seed)
            args = [
                *node_args(seeded, i), "--host", "127.0.0.1", "--port", "0",
                "--announce-host", "127.0.0.1", "--announce-port", link.listen_port,
                *reachability_args(seeded, i, link_address=f"127.0.0.1:{link.listen_port}"),
                "--initial-peers", *self.initial_peers, "--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0",
                "--checkpoint-dir", ckpt,
            ]
            proc = DmoeProcess("node", args, name=f"node{i}", log_path=logs / f"node{i}.log", env=self._child_env())
            self.nodes.append(_Node(i, proc, link, ckpt, node_experts(sc.swarm, i)))
        self._write_run()  # early, so a crashed run still documents its layout
        first = self.nodes[:sc.swarm.nodes]  # late volunteers start at their join events
        for node in first:
            self._launch(node.proc)
        readies = await asyncio.gather(*(asyncio.to_thread(n.proc.wait_ready, timeout) for n in first))
        for node, ready in zip(first, readies, strict=True):
            self._point_link(node, ready)
        logger.info("%d nodes serving behind their links%s", len(first),
                    f"; {sc.swarm.late_nodes} more join later" if sc.swarm.late_nodes else "")

        for j in range(sc.swarm.trainers):
            proc = DmoeProcess("train", self._trainer_args(j), name=f"trainer{j}",
                               log_path=logs / f"trainer{j}.log", env=self._child_env())
            self.trainers.append(proc)
            self._launch(proc)
        await asyncio.gather(*(asyncio.to_thread(t.wait_ready, timeout) for t in self.trainers))
        self.t0_mono, self.t0_wall = time.monotonic(), time.time()
        self.started = True
        for node in self.nodes[:sc.swarm.nodes]:
            self.record(node=node.index, action="link", cause="initial", link=node.link.model.to_dict())
        self._write_run()
        logger.info("%d trainer(s) training; scenario %r runs for %.0f s", len(self.trainers), sc.name,
                    sc.duration_s)

    def _trainer_args(self, j: int) -> list[Any]:
        args: list[Any] = [
            *trainer_args(self.scenario.with_seed(self.seed), j), "--initial-peers", *self.initial_peers,
            "--log-file", self.out / "trainers" / f"trainer{j}.jsonl",
            "--checkpoint-dir", self.out / "checkpoints" / f"trainer{j}",
            "--startup-timeout", self.options.startup_timeout_s, "--no-progress",
        ]
        if self.scenario.swarm.trainers > 1:
            args += ["--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0"]
        return args

    def _point_link(self, node: _Node, ready: dict[str, Any]) -> None:
        host, _, port = str(ready["grpc"]).rpartition(":")
        node.grpc = ready["grpc"]
        node.announced = ready.get("announced")
        node.link.set_target((host or "127.0.0.1", int(port)))

    async def _play(self) -> None:
        """Apply the timeline at its times until the end; keep the progress bar and samples going."""
        sc = self.scenario
        bar = None
        if self.options.progress:
            from tqdm import tqdm

            bar = tqdm(total=int(math.ceil(sc.duration_s)), unit="s", desc=f"simulate {sc.name}",
                       dynamic_ncols=True,
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} s [{elapsed}{postfix}]")
        monitor = asyncio.create_task(self._monitor(bar))
        sampler = asyncio.create_task(self._sample_swarm()) if self.http else None
        try:
            for event in self.timeline.events:
                if not await self._sleep_until(event.t):
                    break
                node = self.nodes[event.node]
                task = asyncio.create_task(self._apply(node, event))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await self._sleep_until(sc.duration_s)
            if self.stopped_by == "duration" and self._trainers_done():
                self.stopped_by = "steps"
        finally:
            for task in (monitor, sampler, *self._tasks):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (monitor, sampler, *self._tasks) if t is not None),
                                 return_exceptions=True)
            if bar is not None:
                bar.n = min(bar.total, int(self.now()))
                bar.refresh()
                bar.close()

    def _trainers_done(self) -> bool:
        return bool(self.trainers) and not any(t.alive() for t in self.trainers)

    async def _sleep_until(self, t: float) -> bool:
        """Sleep until run time ``t``; False if every trainer has finished (the run is over early)."""
        while (left := t - self.now()) > 0:
            if self._trainers_done():
                self.stopped_by = "steps"
                return False
            await asyncio.sleep(min(left, 0.5))
        return not self._trainers_done()

    async def _apply(self, node: _Node, event: ChurnEvent) -> None:
        async with node.lock:
            fields = {k: v for k, v in event.to_dict().items() if k != "t"}
            fields["planned_t"] = round(event.t, 3)
            try:
                await self._do(node, event, fields)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # one failed action must not end the run; it is in the report
                logger.warning("node%d: %s failed: %s", node.index, event.action, e)
                self.record(**{**fields, "action": "error", "failed_action": event.action, "error": str(e)[:500]})

    async def _do(self, node: _Node, event: ChurnEvent, fields: dict[str, Any]) -> None:
        proc, link = node.proc, node.link
        action = event.action
        if action == "crash":
            self.record(**fields, pid=proc.pid if proc.proc else None)
            await asyncio.to_thread(proc.kill)
            self._forget_helpers(node)
            link.set_target(None)
        elif action == "leave":
            self.record(**fields, pid=proc.pid if proc.proc else None)
            code = await asyncio.to_thread(proc.stop, self.options.stop_timeout_s)
            self._forget_helpers(node)
            link.set_target(None)
            if code not in (0, None):
                logger.info("node%d left with exit code %s", node.index, code)
        elif action == "freeze":
            self.record(**fields)
            self._freeze(node)
        elif action == "resume":
            self.record(**fields)
            self._resume(node)
        elif action in ("rejoin", "join"):
            if proc.alive():  # e.g. a leave that had not finished: make sure the old one is gone
                await asyncio.to_thread(proc.kill)
            self._forget_helpers(node)
            if not event.keep_checkpoint:
                await asyncio.to_thread(shutil.rmtree, node.checkpoint_dir, True)
            self.record(**fields)
            if proc.proc is not None and self.reaper is not None:
                self.reaper.forget(proc.pid)
            started = time.monotonic()
            self._launch(proc)
            ready = await asyncio.to_thread(proc.wait_ready, self.options.startup_timeout_s)
            self._point_link(node, ready)
            self.record(node=node.index, action="ready", startup_s=round(time.monotonic() - started, 3))
        elif action == "partition":
            self.record(**fields)
            link.partition(None, event.mode or "blackhole")
        elif action == "heal":
            self.record(**fields)
            link.heal()
        elif action == "link":
            self.record(**fields)
            link.set_model(LinkModel(**(event.link or {})))
        else:
            raise ValueError(f"unknown action {action!r}")

    def _freeze(self, node: _Node) -> None:
        """SIGSTOP the node's whole process tree (``DmoeProcess.freeze``: its p2pd too).

        Helpers that lead sessions of their own are handed to the reaper, which resumes and kills
        them should the simulator die while they are stopped.
        """
        for pid in node.proc.freeze():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if self.reaper is not None and os.getpgid(pid) == pid:
                    self.reaper.watch(pid)
                    node.watched_helpers.append(pid)

    def _resume(self, node: _Node) -> None:
        node.proc.resume()
        self._forget_helpers(node)

    def _forget_helpers(self, node: _Node) -> None:
        """The node's frozen helpers were resumed or died with it: the reaper need not watch them."""
        if self.reaper is not None:
            for pid in node.watched_helpers:
                self.reaper.forget(pid)
        node.watched_helpers.clear()

    async def _monitor(self, bar: Any) -> None:
        """Progress bar and a log line for processes that exit on their own."""
        readers = {t.name: _Tail(self.out / "trainers" / f"{t.name}.jsonl") for t in self.trainers}
        last: dict[str, dict[str, Any]] = {}
        last_loss: dict[str, float] = {}
        while True:
            for name, tail in readers.items():
                for rec in tail.new_records():
                    if rec.get("type") == "step":
                        last[name] = rec
                        if rec.get("loss") is not None:
                            last_loss[name] = rec["loss"]
            for proc in self._all_procs():
                if proc.proc is not None and not proc.alive() and proc.name not in self._exited_reported:
                    expected = proc.proc.returncode in (-signal.SIGKILL, 0, -signal.SIGTERM)
                    node = next((n for n in self.nodes if n.proc is proc), None)
                    if node is not None and node.lock.locked():
                        continue  # an event is handling it
                    if node is None or not expected:
                        self._exited_reported.add(proc.name)
                        self.record(node=node.index if node else None, action="exited", process=proc.name,
                                    code=proc.proc.returncode)
                        if proc.proc.returncode not in (0, None):
                            logger.warning("%s exited with code %s; last log lines:\n%s", proc.name,
                                           proc.proc.returncode, proc.log_tail(8))
            if bar is not None:
                up = sum(1 for n in self.nodes if n.proc.alive() and not n.proc.frozen and not n.link.partitioned)
                post = {"nodes": f"{up}/{len(self.nodes)}"}
                if last:
                    steps = [r.get("step", 0) for r in last.values()]
                    losses = list(last_loss.values())
                    post["step"] = str(max(steps))
                    if losses:
                        post["loss"] = f"{sum(losses) / len(losses):.3f}"
                    post["failed"] = str(sum(sum((r.get("failures_total") or {}).values()) for r in last.values()))
                bar.set_postfix(post, refresh=False)
                bar.n = min(bar.total, int(self.now()))
                bar.refresh()
            await asyncio.sleep(1.0)

    async def _sample_swarm(self) -> None:
        """Sample the coordinator's view of the DHT (what a trainer could find) into swarm.jsonl."""
        url = f"http://{self.http}/status"

        def fetch() -> dict[str, Any]:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - our own loopback coordinator
                return json.loads(resp.read())

        while True:
            try:
                status = await asyncio.to_thread(fetch)
                prefixes = status.get("prefixes") or {}
                layers = {k: p for k, p in prefixes.items() if str(p.get("prefix", "")).startswith("layer")}
                rec = {"t": round(self.now(), 3), "wall": round(time.time(), 3), "nodes": len(status.get("nodes", [])),
                       "load": round(os.getloadavg()[0], 2), "steal_pct": self._steal.sample(),
                       "experts_alive": sum(int(p.get("alive", 0)) for p in layers.values()),
                       "replication": swarm_replication({"prefixes": layers}) or {},
                       "lineage": swarm_lineage({"prefixes": layers})}
                if self._swarm_file is not None:
                    self._swarm_file.write(json.dumps(rec) + "\n")
                    self._swarm_file.flush()
            except Exception as e:  # the view is a nice-to-have; never stop the run for it
                logger.debug("coordinator status failed: %s", e)
            await asyncio.sleep(self.options.status_period_s)

    async def _shutdown(self) -> None:
        """Stop everything, trainers first; never raises."""
        stop_t = self.options.stop_timeout_s
        tr = self.scenario.trainer
        trainer_wait = max(stop_t, tr.forward_timeout_s + tr.backward_timeout_s + 15)
        for node in self.nodes:  # a frozen node would hold trainers' calls until their deadlines
            if node.proc.frozen:
                self._resume(node)
            node.link.heal()
        with contextlib.suppress(Exception):
            await asyncio.gather(*(asyncio.to_thread(t.stop, trainer_wait) for t in self.trainers),
                                 return_exceptions=True)
        if self.started:
            self.record(action="end", stopped_by=self.stopped_by)
        with contextlib.suppress(Exception):
            await asyncio.gather(*(asyncio.to_thread(n.proc.stop, stop_t) for n in self.nodes),
                                 return_exceptions=True)
        if self.bootstrap is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.bootstrap.stop, stop_t)
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.link.close()
        for proc in self._all_procs():  # belt and braces: anything left in the groups
            if proc.proc is not None:
                proc.send_signal(signal.SIGKILL)
                if self.reaper is not None:
                    self.reaper.forget(proc.pid)


class _Tail:
    """Reads the records appended to a JSON-lines file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def new_records(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out


def run_simulation(scenario: Scenario, options: SimulationOptions) -> dict[str, Any] | None:
    """Run ``scenario`` in a fresh uvloop event loop; returns the report's summary."""
    import uvloop

    return uvloop.run(Simulation(scenario, options).run())


if __name__ == "__main__":
    if sys.argv[1:] == ["--reaper"]:
        sys.exit(_reaper_main())
    print("usage: dmoe simulate [SCENARIO.toml] (this module is not a command of its own)", file=sys.stderr)
    sys.exit(2)
