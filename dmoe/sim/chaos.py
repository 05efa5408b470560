"""Play a scenario's churn timeline against the node containers of a docker-compose swarm.

The timeline is the simulator's (``dmoe.sim.churn.ChurnModel``: same scenario and seed, same events);
only its execution differs. Node ``i`` of the timeline is the compose container with
``com.docker.compose.container-number`` ``i + 1`` of the ``node`` service in our own compose
project (found from our container's labels, so two swarms on one engine never touch each other).
Each action becomes a Docker API call:

=========  ==========================================================================
crash      ``kill`` (SIGKILL to every process of the container)
leave      SIGTERM (``kill -s TERM``); SIGKILL if it is still running after the grace period
freeze     ``pause`` (cgroup freezer: calls to it hang until their deadline)
resume     ``unpause``
rejoin     ``start`` the same container; without its checkpoint when the timeline says so
           (a marker the entrypoint sees: it wipes the checkpoint directory first)
partition  SIGUSR1 to the container: the node's link emulator starts dropping everything
heal       SIGUSR2: the link emulator heals
link       not supported in containers (the link is fixed at start); logged as an error record
=========  ==========================================================================

Output, in the same layout ``dmoe simulate`` writes (``dmoe/sim/report.py`` reads both):
``run.json`` (scenario, seed, ``t0``, nodes with experts and links), ``events.jsonl`` (each
applied event with its actual time, ``ready`` when a restarted node prints ``dmoe-ready`` again,
``error`` records for calls that failed) and ``swarm.jsonl`` (the coordinator's view, sampled).
The clock starts once every node container is up and the trainers have made a few steps, so
churn hits a swarm that is actually training. At the end every node is resumed/started again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from dmoe.config.sim import ChaosOptions
from dmoe.errors import ConfigError
from dmoe.ready import READY_PREFIX, parse_ready
from dmoe.sim.churn import ChurnEvent, ChurnModel, Timeline
from dmoe.sim.docker_api import ContainerInfo, DockerAPI, DockerAPIError
from dmoe.sim.report import swarm_lineage, swarm_replication
from dmoe.sim.scenario import Scenario
from dmoe.sim.swarm_layout import experts_per_layer, node_experts, node_link

logger = logging.getLogger("dmoe.chaos")

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"


def own_project(api: DockerAPI) -> str:
    """The compose project of the container we run in (its hostname is its container id)."""
    try:
        labels = api.inspect(socket.gethostname())["Config"]["Labels"] or {}
    except DockerAPIError as e:
        raise ConfigError(f"cannot tell our compose project (not in a compose container? use --project): {e}") from e
    if PROJECT_LABEL not in labels:
        raise ConfigError("our container has no compose project label; pass --project")
    return labels[PROJECT_LABEL]


class EventLog:
    """events.jsonl writer; every record is also logged as one line."""

    def __init__(self, path: Path, t0: float) -> None:
        self.path = path
        self.t0 = t0
        self._lock = threading.Lock()
        path.write_text("")

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {"t": round(time.time() - self.t0, 3), **record}
        with self._lock, self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        logger.info("event %s", json.dumps(record, sort_keys=True))
        return record


class ChaosRunner:
    """Finds the node containers, waits for a training swarm, then executes the timeline."""

    def __init__(self, api: DockerAPI, scenario: Scenario, options: ChaosOptions) -> None:
        self.api = api
        self.scenario = scenario
        self.options = options
        self.project = options.project or own_project(api)
        self.out = options.out_dir
        self.containers: dict[int, ContainerInfo] = {}
        self.pending_ready: dict[int, float] = {}  # node -> unix time it was started
        self.stopping: dict[int, float] = {}  # node -> unix time after which a leave becomes a kill
        self.partitioned: set[int] = set()
        self.log: EventLog | None = None
        self.timeline: Timeline | None = None

    # ----- discovery ------------------------------------------------------------------------------
    def find_nodes(self) -> dict[int, ContainerInfo]:
        found = self.api.containers(labels={PROJECT_LABEL: self.project, SERVICE_LABEL: self.options.service})
        by_index: dict[int, ContainerInfo] = {}
        for c in found:
            try:
                by_index[int(c.labels.get(NUMBER_LABEL, "")) - 1] = c
            except ValueError:
                continue
        return dict(sorted(by_index.items()))

    def _printed_ready(self, container: ContainerInfo | str, since: float = 0) -> bool:
        """Has the container's ``dmoe node`` printed its ready line (since unix time ``since``)?

        The link emulator in the same container prints one too (role ``link``); only ``node`` counts.
        """
        cid = container.id if isinstance(container, ContainerInfo) else container
        try:
            text = self.api.logs(cid, since=since)
        except DockerAPIError:
            return False
        for line in text.splitlines():
            at = line.find(READY_PREFIX)
            if at >= 0:
                ready = parse_ready(line[at:])
                if ready is not None and ready.get("role") == "node":
                    return True
        return False

    def _trainer_steps(self, since: float) -> int:
        steps = 0
        for path in (self.out / "trainers").glob("*.jsonl"):
            with contextlib.suppress(OSError):
                for line in path.read_text(errors="replace").splitlines():
                    with contextlib.suppress(ValueError):
                        rec = json.loads(line)
                        if rec.get("type") == "step" and not rec.get("skipped") and rec.get("time", 0) >= since:
                            steps += 1
        return steps

    def wait_for_swarm(self) -> None:
        """Until every node container printed ``dmoe-ready`` and the trainers made ``wait_steps`` steps."""
        began = time.time()
        deadline = time.monotonic() + self.options.wait_timeout_s
        last_note = ""
        while True:
            self.containers = self.find_nodes()
            ready = [i for i, c in self.containers.items() if self._printed_ready(c)]
            steps = self._trainer_steps(began) if self.options.wait_steps else 0
            note = f"{len(ready)}/{len(self.containers)} node containers ready, {steps} trainer steps"
            if note != last_note:
                logger.info("waiting for the swarm: %s", note)
                last_note = note
            if self.containers and len(ready) == len(self.containers) and steps >= self.options.wait_steps:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"swarm not ready after {self.options.wait_timeout_s:.0f}s: {note}")
            time.sleep(1.0)

    # ----- run ----------------------------------------------------------------------------------------
    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / ".chaos").mkdir(exist_ok=True)
        for stale in (self.out / ".chaos").glob("*"):
            stale.unlink(missing_ok=True)
        self.wait_for_swarm()
        n = len(self.containers)
        scenario = replace(self.scenario, swarm=replace(self.scenario.swarm, nodes=n))
        self.timeline = ChurnModel(scenario).timeline()
        t0 = time.time()
        self.log = EventLog(self.out / "events.jsonl", t0)
        self._write_run_json(t0, elapsed=None)
        logger.info("chaos started on %d node containers of project %s: %d events over %.0fs %s", n, self.project,
                    len(self.timeline.events), scenario.duration_s, json.dumps(self.timeline.counts()))
        for skipped in self.timeline.skipped:
            logger.info("scheduled action skipped: %s", json.dumps(skipped))
        stop = threading.Event()
        sampler = threading.Thread(target=self._sample_swarm, args=(t0, stop), daemon=True)
        if self.options.coordinator_url:
            sampler.start()
        try:
            for event in self.timeline.events:
                self._wait_until(t0 + event.t)
                self.apply(event)
            self._wait_until(t0 + scenario.duration_s)
            if self.options.restore_at_end:
                self.restore()
            self._wait_for_pending(self.options.ready_timeout_s)
        finally:
            stop.set()
            self._write_run_json(t0, elapsed=time.time() - t0)
        logger.info("chaos finished after %.0fs", time.time() - t0)
        return 0

    def _wait_until(self, when: float) -> None:
        """Sleep until ``when``, meanwhile noting restarted nodes that became ready and finishing leaves."""
        while True:
            self._poll_pending()
            left = when - time.time()
            if left <= 0:
                return
            time.sleep(min(left, 0.5))

    def _wait_for_pending(self, timeout: float) -> None:
        """After the last event: give restarted nodes time to print their ready line (for the report)."""
        deadline = time.time() + timeout
        while self.pending_ready and time.time() < deadline:
            self._wait_until(min(deadline, time.time() + 1))
        for node in list(self.pending_ready):
            assert self.log is not None
            self.log.write({"node": node, "action": "error", "planned": "ready",
                            "error": f"node {node} did not print dmoe-ready within {timeout:.0f}s of its restart"})

    def _poll_pending(self) -> None:
        assert self.log is not None
        for node, started in list(self.pending_ready.items()):
            if self._printed_ready(self.containers[node], since=started):
                del self.pending_ready[node]
                record = {"node": node, "action": "ready", "container": self.containers[node].name,
                          "after_s": round(time.time() - started, 3)}
                if node in self.partitioned:
                    with contextlib.suppress(DockerAPIError):
                        self.api.kill(self.containers[node].id, "USR1")
                        record["note"] = "partitioned: link cut"
                self.log.write(record)
        for node, deadline in list(self.stopping.items()):
            if time.time() < deadline:
                continue
            del self.stopping[node]
            with contextlib.suppress(DockerAPIError):
                if self.api.state(self.containers[node].id) == "running":
                    self.api.kill(self.containers[node].id, "KILL")
                    logger.info("node %d did not leave within %.0fs: killed", node, self.options.stop_grace_s)

    def apply(self, event: ChurnEvent) -> None:
        """Execute one timeline event on its container and log it (or log why it failed)."""
        assert self.log is not None
        container = self.containers.get(event.node)
        record = {**event.to_dict(), "planned_t": round(event.t, 3)}
        record.pop("t")
        if container is None:
            self.log.write({**record, "action": "error", "planned": event.action,
                            "error": f"no container for node {event.node}"})
            return
        record["container"] = container.name
        cid = container.id
        try:
            match event.action:
                case "crash":
                    self.api.kill(cid, "KILL")
                    self.pending_ready.pop(event.node, None)
                case "leave":
                    self.api.kill(cid, "TERM")
                    self.pending_ready.pop(event.node, None)
                    self.stopping[event.node] = time.time() + self.options.stop_grace_s
                case "freeze":
                    self.api.pause(cid)
                case "resume":
                    self.api.unpause(cid)
                case "rejoin":
                    self._rejoin(event.node, container, keep_checkpoint=event.keep_checkpoint is not False)
                case "partition":
                    self.partitioned.add(event.node)
                    if not self._signal_link(event.node, "USR1"):
                        record["note"] = "node not serving: its link is cut once it serves again"
                    if event.mode not in (None, "blackhole"):
                        record["mode_played"] = "blackhole"
                case "heal":
                    self.partitioned.discard(event.node)
                    if not self._signal_link(event.node, "USR2"):
                        record["note"] = "node not serving: its link starts healed"
                case _:
                    raise DockerAPIError(f"{event.action!r} is not supported against containers")
        except DockerAPIError as e:
            self.log.write({**record, "action": "error", "planned": event.action, "error": str(e)})
            return
        self.log.write(record)

    def _signal_link(self, node: int, signal: str) -> bool:
        """Signal the node's link emulator (via the entrypoint) if the node is up and serving.

        A container that is down or still starting could not take the signal (its processes may not
        have their handlers yet), so partitions of such nodes are applied when they serve again.
        """
        if node in self.pending_ready or self.api.state(self.containers[node].id) not in ("running", "paused"):
            return False
        self.api.kill(self.containers[node].id, signal)
        return True

    def _rejoin(self, node: int, container: ContainerInfo, *, keep_checkpoint: bool) -> None:
        self.stopping.pop(node, None)
        if self.api.state(container.id) == "running":  # a leave that has not finished yet
            self.api.kill(container.id, "KILL")
            self._wait_exited(container.id)
        if not keep_checkpoint:
            (self.out / ".chaos" / f"{container.name}.wipe-checkpoint").touch()
        started = time.time() - 1  # `since` has one-second granularity
        self.api.start(container.id)
        self.pending_ready[node] = started

    def _wait_exited(self, cid: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.api.state(cid) not in ("exited", "dead", "created") and time.monotonic() < deadline:
            time.sleep(0.2)

    def restore(self) -> None:
        """Bring every node back (resume frozen, start stopped) so the swarm is whole again."""
        assert self.log is not None
        for node, container in self.containers.items():
            try:
                state = self.api.state(container.id)
                if state == "paused":
                    self.api.unpause(container.id)
                    self.log.write({"node": node, "action": "resume", "cause": "end", "container": container.name})
                elif state in ("exited", "dead", "created"):
                    self._rejoin(node, container, keep_checkpoint=True)
                    self.log.write({"node": node, "action": "rejoin", "cause": "end", "container": container.name,
                                    "keep_checkpoint": True})
            except DockerAPIError as e:
                self.log.write({"node": node, "action": "error", "planned": "restore", "error": str(e)})

    # ----- report inputs ----------------------------------------------------------------------------
    def _write_run_json(self, t0: float, elapsed: float | None) -> None:
        slots = self.options.nodes or self.scenario.swarm.nodes
        nodes = [{"index": i, "name": c.name, "container": c.short_id,
                  "experts": node_experts(self.scenario.swarm, i, slots),
                  "link": node_link(self.scenario, i).to_dict()} for i, c in self.containers.items()]
        run = {"launcher": "docker-compose", "project": self.project, "scenario": self.scenario.to_dict(),
               "seed": self.scenario.seed, "t0": t0, "duration_s": self.scenario.duration_s,
               "elapsed_s": None if elapsed is None else round(elapsed, 3), "nodes": nodes,
               "min_experts": self.scenario.min_experts, "experts_per_layer": experts_per_layer(self.scenario.swarm),
               "timeline": {"counts": self.timeline.counts() if self.timeline else {},
                            "skipped": list(self.timeline.skipped) if self.timeline else []}}
        tmp = self.out / "run.json.tmp"
        tmp.write_text(json.dumps(run, indent=1, default=_json_default) + "\n")
        tmp.replace(self.out / "run.json")

    def _sample_swarm(self, t0: float, stop: threading.Event) -> None:
        path = self.out / "swarm.jsonl"
        path.write_text("")
        url = (self.options.coordinator_url or "").rstrip("/") + "/status"
        while not stop.wait(self.options.sample_period_s):
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    status = json.load(resp)
            except (OSError, ValueError):
                continue
            record = {"t": round(time.time() - t0, 3), "nodes": len(status.get("nodes", [])),
                      "experts_alive": sum(p.get("alive", 0) for p in status.get("prefixes", {}).values()),
                      "replication": swarm_replication(status) or {}, "lineage": swarm_lineage(status)}
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, set | tuple):
        return list(value)
    return str(value)
