"""Serving throughput of a dmoe node vs hivemind's expert server, and remote/local overhead.

    .venv/bin/python benchmarks/serving.py --out runs/bench_serving.json

1. Throughput (samples/s, forward + backward): E experts on one server, C concurrent client
   processes; every client step is one Forward then one Backward of a [batch, hidden] tensor to
   one expert (clients start at different experts and go round robin). dmoe is a ``dmoe node``
   process; hivemind is ``hivemind.moe.server`` (``background_server``) with its default settings,
   called with hivemind's ``RemoteExpert`` (autograd forward + backward). Both servers run the
   *same* module (dmoe's ffn, registered in hivemind as ``dmoe_ffn`` by hivemind_experts.py),
   with Adam, in the same run, on the same machine.
2. Remote/local ratio: one client calling one ffn expert (hidden 1024, batch 64) over loopback,
   vs the same computation in-process (``ExpertBackend.forward`` + ``.backward``: forward under
   inference mode, then recompute + backward + clip + Adam step, exactly what the node does).
   A plain local training step (forward with autograd, backward, step: no recompute) is printed
   too: the goal of issue 13 is remote >= 0.9 of it. The remote client tags its calls (``call_id``,
   as trainers do), so the node keeps each forward for its backward (``dmoe.node.activations``); the
   same client without ids (the node recomputes, as before) is measured in the same windows.

Fairness on a shared machine: both servers (and, for the ratio, the remote client and the local
workers) are up at the same time, idle between measurement windows, and measured in alternating
windows (``--rounds``), so load from other processes falls on every side alike. The local side is
measured with and without ``OMP_WAIT_POLICY=PASSIVE`` (which ``dmoe node`` sets for itself) and
the faster is used.

Prints a table and writes JSON (--out). Numbers depend on the machine and on other load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass
class ThroughputConfig:
    experts: int
    clients: int
    hidden: int
    batch: int


# ---- worker processes (spawned: clean torch/grpc state; idle between measurement windows) ----

def _make_step(kind: str, params: dict[str, Any], index: int) -> Any:
    """A callable doing one forward + backward of ``[batch, hidden]`` the way ``kind`` does it."""
    import torch

    hidden, batch, uids = params["hidden"], params["batch"], params.get("uids", ["bench.0"])
    x, g = torch.randn(batch, hidden), torch.randn(batch, hidden)
    turn = {"i": index}

    def next_uid() -> str:
        turn["i"] += 1
        return uids[turn["i"] % len(uids)]

    if kind == "dmoe":
        import grpc

        from dmoe.wire.codec import GRPC_OPTIONS, deserialize_tensors, serialize_tensors
        from dmoe.wire.proto import expert_pb2 as pb
        from dmoe.wire.proto import expert_pb2_grpc as pb_grpc

        torch.set_num_threads(1)
        stub = pb_grpc.ExpertServiceStub(grpc.insecure_channel(params["endpoint"], options=GRPC_OPTIONS))

        keep = params.get("call_ids", True)  # as a trainer does: the node keeps the forward for the backward

        def step() -> None:
            uid = next_uid()
            call = os.urandom(8).hex() if keep else ""
            (y,) = deserialize_tensors(stub.Forward(
                pb.ExpertRequest(uid=uid, tensors=serialize_tensors([x]), call_id=call), timeout=60).tensors)
            (gx,) = deserialize_tensors(stub.Backward(
                pb.ExpertRequest(uid=uid, tensors=serialize_tensors([x, g]), call_id=call), timeout=60).tensors)
            assert y.shape == gx.shape == x.shape

        return step
    if kind == "hivemind":
        import hivemind
        from hivemind.moe.client.expert import create_remote_experts
        from hivemind.moe.expert_uid import ExpertInfo
        from hivemind.p2p import PeerID

        torch.set_num_threads(1)
        dht = hivemind.DHT(initial_peers=params["maddrs"], client_mode=True, start=True)
        infos = [ExpertInfo(uid, PeerID.from_base58(params["peer_id"])) for uid in uids]
        experts = dict(zip(uids, create_remote_experts(infos, dht), strict=True))

        def step() -> None:
            xr = x.clone().requires_grad_()
            y = experts[next_uid()](xr)
            y.backward(g)
            assert y.shape == xr.grad.shape == x.shape

        return step

    from dmoe.node.backend import ExpertBackend

    from dmoe.config.node import OptimizerOptions
    from dmoe.experts import create_expert, expert_schema

    module = create_expert("ffn", hidden_dim=hidden, uid="bench.0")
    if kind == "local_served":  # exactly what the node computes for one Forward + one Backward
        backend = ExpertBackend("bench.0", module, schema=expert_schema(module, hidden), expert_cls="ffn",
                                hidden_dim=hidden, optimizer=OptimizerOptions())

        def step() -> None:
            backend.forward([x])
            backend.backward([x], [g])

        return step
    if kind == "local_train":  # an ordinary local training step: autograd forward, backward, clip, Adam
        opt = torch.optim.Adam(module.parameters())

        def step() -> None:
            module(x.clone().requires_grad_()).backward(g)
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            opt.zero_grad()

        return step
    raise ValueError(kind)


def _worker(kind: str, params: dict[str, Any], index: int, ready: Any, commands: Any, results: Any) -> None:
    step = _make_step(kind, params, index)
    for _ in range(3):  # warm up connections and lazy initialisation
        step()
    ready.put(index)
    while (command := commands.get()) is not None:
        t_start, t_end = command
        samples, latencies, cpu = 0, [], 0.0
        while (began := time.time()) < t_end:
            cpu_began = time.process_time()  # this process, all threads
            step()
            done = time.time()
            if began >= t_start and done <= t_end:
                samples += params["batch"]
                latencies.append(done - began)
                cpu += time.process_time() - cpu_began
        results.put({"samples": samples, "latencies": latencies, "cpu": cpu})


class WorkerGroup:
    """Processes that step together during measurement windows and sleep in between."""

    def __init__(self, name: str, kind: str, params: dict[str, Any], count: int = 1,
                 env: dict[str, str] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self.ready, self.results = ctx.Queue(), ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(count)]
        saved = dict(os.environ)
        os.environ.update(env or {})  # spawned children inherit the environment at start
        try:
            self.procs = [ctx.Process(target=_worker, args=(kind, params, i, self.ready, self.commands[i],
                                                             self.results)) for i in range(count)]
            for p in self.procs:
                p.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.samples, self.seconds, self.latencies, self.cpu = 0, 0.0, [], 0.0
        self.server_pid: int | None = None  # a server process whose CPU time is charged to this group

    def wait_ready(self) -> None:
        for _ in self.procs:
            self.ready.get(timeout=240)

    def measure(self, seconds: float, lead_in: float) -> None:
        t_start = time.time() + lead_in
        for q in self.commands:
            q.put((t_start, t_start + seconds))
        server_cpu = None
        if self.server_pid is not None:
            time.sleep(max(0.0, t_start - time.time()))
            server_cpu = _process_cpu(self.server_pid)
        for _ in self.procs:
            r = self.results.get(timeout=seconds + lead_in + 120)
            self.samples += r["samples"]
            self.latencies.extend(r["latencies"])
            self.cpu += r["cpu"]
        if server_cpu is not None:
            self.cpu += _process_cpu(self.server_pid) - server_cpu
        self.seconds += seconds

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "samples_per_s": self.samples / self.seconds if self.seconds else 0.0,
            "steps": len(lat),
            "step_latency_ms_p50": 1000 * lat[len(lat) // 2] if lat else None,
            "step_latency_ms_p90": 1000 * lat[int(len(lat) * 0.9)] if lat else None,
            "cpu_ms_per_sample": 1000 * self.cpu / self.samples if self.samples else None,
        }

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _interleave(stack: ExitStack, groups: list[WorkerGroup], *, duration: float, rounds: int,
                lead_in: float) -> None:
    """Measure each group in turn, ``rounds`` times, so load drift on the machine hits all alike."""
    for g in groups:
        stack.callback(g.close)
    for g in groups:
        g.wait_ready()
    for _ in range(rounds):
        for g in groups:
            g.measure(duration / rounds, lead_in)


# ---- servers ----

def _start_dmoe_node(stack: ExitStack, uids: list[str], hidden: int, tmp: Path, extra: list[str]) -> tuple[str, int]:
    from dmoe.sim.launcher import DmoeProcess

    # every benchmark client calls from 127.0.0.1, far faster than a trainer: no per-address Backward rate
    args = ["--experts", ",".join(uids), "--hidden-dim", str(hidden), "--host", "127.0.0.1", "--backward-rate", "0",
            *extra]
    proc = DmoeProcess("node", args, name="node", log_path=tmp / f"node-{time.time():.0f}.log").start()
    stack.callback(proc.stop)
    return proc.wait_ready(120)["grpc"], proc.pid


def _hivemind_server_child(uids: list[str], hidden: int) -> None:
    """Runs in its own process session: hivemind's server with default settings, until stdin closes."""
    import torch
    from hivemind.moe.server import Server

    server = Server.create(
        expert_uids=uids, expert_cls="dmoe_ffn", hidden_dim=hidden, optim_cls=torch.optim.Adam,
        custom_module_path=str(HERE / "hivemind_experts.py"), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        clip_grad_norm=1.0, device="cpu", start=True,
    )
    server.ready.wait(120)
    info = {"maddrs": [str(a) for a in server.dht.get_visible_maddrs()], "peer_id": server.dht.peer_id.to_base58()}
    print("HIVEMIND-READY " + json.dumps(info), flush=True)
    sys.stdin.read()  # the benchmark closes our stdin when it is done
    server.shutdown()


def _start_hivemind_server(stack: ExitStack, uids: list[str], hidden: int) -> tuple[list[str], str]:
    # a session of its own: hivemind's server forks handler processes; killpg reaches all of them
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--hivemind-server-child", ",".join(uids), str(hidden)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )

    def stop() -> None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    stack.callback(stop)
    for line in proc.stdout:
        if line.startswith("HIVEMIND-READY "):
            info = json.loads(line.split(" ", 1)[1])
            return info["maddrs"], info["peer_id"]
    raise RuntimeError("hivemind server exited before it was ready")


def throughput(cfg: ThroughputConfig, *, duration: float, rounds: int, lead_in: float, tmp: Path,
               node_args: list[str], with_hivemind: bool) -> dict[str, Any]:
    uids = [f"bench.{i}" for i in range(cfg.experts)]
    params = {"uids": uids, "hidden": cfg.hidden, "batch": cfg.batch}
    with ExitStack() as stack:
        endpoint, _ = _start_dmoe_node(stack, uids, cfg.hidden, tmp, node_args)
        groups = [WorkerGroup("dmoe", "dmoe", {**params, "endpoint": endpoint}, cfg.clients)]
        if with_hivemind:
            maddrs, peer_id = _start_hivemind_server(stack, uids, cfg.hidden)
            groups.append(WorkerGroup("hivemind", "hivemind", {**params, "maddrs": maddrs, "peer_id": peer_id},
                                      cfg.clients))
        _interleave(stack, groups, duration=duration, rounds=rounds, lead_in=lead_in)
        return {g.name: g.summary() for g in groups}


def remote_local_ratio(*, hidden: int, batch: int, duration: float, rounds: int, lead_in: float, tmp: Path,
                       node_args: list[str]) -> dict[str, Any]:
    params = {"hidden": hidden, "batch": batch}
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}  # what the node sets for itself; the local side gets both tries
    with ExitStack() as stack:
        endpoint, node_pid = _start_dmoe_node(stack, ["bench.0"], hidden, tmp, node_args)
        remote = WorkerGroup("remote", "dmoe", {**params, "endpoint": endpoint})
        remote.server_pid = node_pid  # remote CPU = client process + node process
        # before issue 13's activation keeping: calls without ids, the node recomputes each forward in the backward
        recompute = WorkerGroup("remote_recompute", "dmoe", {**params, "endpoint": endpoint, "call_ids": False})
        recompute.server_pid = node_pid
        local = [WorkerGroup("local_served", "local_served", params),
                 WorkerGroup("local_served_passive", "local_served", params, env=passive),
                 WorkerGroup("local_train", "local_train", params),
                 WorkerGroup("local_train_passive", "local_train", params, env=passive)]
        _interleave(stack, [remote, recompute, *local], duration=duration, rounds=rounds, lead_in=lead_in)
        rates = {g.name: g.summary()["samples_per_s"] for g in [remote, recompute, *local]}
        cpu = {g.name: g.summary()["cpu_ms_per_sample"] for g in [remote, recompute, *local]}
    kept = _kept_bytes_per_call(hidden, batch)
    served = max(rates["local_served"], rates["local_served_passive"])
    train = max(rates["local_train"], rates["local_train_passive"])
    local_cpu = min(c for c in (cpu["local_served"], cpu["local_served_passive"]) if c is not None)
    return {
        "hidden": hidden, "batch": batch,
        "remote_samples_per_s": rates["remote"],
        "local_served_step_samples_per_s": served,
        "local_train_step_samples_per_s": train,
        "ratio": rates["remote"] / served,
        "ratio_vs_plain_train_step": rates["remote"] / train,
        "remote_recompute_samples_per_s": rates["remote_recompute"],
        "ratio_vs_plain_train_step_recompute": rates["remote_recompute"] / train,
        "all_rates": rates,
        # load-independent view: CPU time per sample, local vs remote (client + node processes)
        "cpu_ms_per_sample": cpu,
        "cpu_ratio": local_cpu / cpu["remote"],
        "remote_step_latency_ms_p50": remote.summary()["step_latency_ms_p50"],
        "kept_bytes_per_call": kept,
    }


def _kept_bytes_per_call(hidden: int, batch: int) -> int:
    """Memory a node holds for one tagged forward until its backward (the activation cache's own count)."""
    import torch
    from dmoe.node.activations import ActivationCache
    from dmoe.node.backend import ExpertBackend

    from dmoe.config.node import OptimizerOptions
    from dmoe.experts import create_expert, expert_schema

    module = create_expert("ffn", hidden_dim=hidden, uid="bench.0")
    backend = ExpertBackend("bench.0", module, schema=expert_schema(module, hidden), expert_cls="ffn",
                            hidden_dim=hidden, optimizer=OptimizerOptions())
    cache = ActivationCache(max_bytes=2**40, ttl=60)
    backend.forward_kept([torch.randn(batch, hidden)], {"one": (0, batch)}, cache)
    return cache.bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per system and config")
    p.add_argument("--rounds", type=int, default=5, help="alternating measurement windows per system")
    p.add_argument("--lead-in", type=float, default=1.0, help="unmeasured seconds before each window")
    p.add_argument("--configs", default="2x2x256x64",
                   help="comma-separated EXPERTSxCLIENTSxHIDDENxBATCH throughput configs")
    p.add_argument("--ratio", default="1024x64", help="HIDDENxBATCH of the remote/local run; '' skips it")
    p.add_argument("--skip-hivemind", action="store_true", help="measure dmoe only")
    p.add_argument("--node-args", default="", help="extra flags for the dmoe node, e.g. '--num-workers 2'")
    p.add_argument("--out", default="runs/bench_serving.json", help="JSON output path")
    p.add_argument("--hivemind-server-child", nargs=2, metavar=("UIDS", "HIDDEN"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hivemind_server_child:
        _hivemind_server_child(args.hivemind_server_child[0].split(","), int(args.hivemind_server_child[1]))
        return 0
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    node_args = args.node_args.split()
    configs = [ThroughputConfig(*map(int, c.split("x"))) for c in args.configs.split(",") if c]
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "duration_s": args.duration, "rounds": args.rounds, "throughput": [], "ratio": None,
        "load_average_at_start": os.getloadavg(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="dmoe-bench-"))
    for cfg in configs:
        print(f"measuring {cfg.experts} experts x {cfg.clients} clients, hidden {cfg.hidden}, batch {cfg.batch} ...",
              flush=True)
        row: dict[str, Any] = {**asdict(cfg), **throughput(
            cfg, duration=args.duration, rounds=args.rounds, lead_in=args.lead_in, tmp=tmp, node_args=node_args,
            with_hivemind=not args.skip_hivemind)}
        if "hivemind" in row:
            row["speedup"] = row["dmoe"]["samples_per_s"] / row["hivemind"]["samples_per_s"]
        report["throughput"].append(row)
    if args.ratio:
        hidden, batch = map(int, args.ratio.split("x"))
        print(f"measuring remote/local: hidden {hidden}, batch {batch} ...", flush=True)
        report["ratio"] = remote_local_ratio(hidden=hidden, batch=batch, duration=args.duration,
                                             rounds=args.rounds, lead_in=args.lead_in, tmp=tmp, node_args=node_args)

    print()
    print(f"{'config (experts x clients, hidden, batch)':<44}{'dmoe s/s':>11}{'hivemind s/s':>14}{'dmoe/hm':>9}"
          f"{'p50 ms dmoe':>13}{'p50 ms hm':>11}")
    for row in report["throughput"]:
        hm = row.get("hivemind")
        print(f"{row['experts']} x {row['clients']}, hidden {row['hidden']}, batch {row['batch']:<18}"
              f"{row['dmoe']['samples_per_s']:>11.0f}{(hm['samples_per_s'] if hm else float('nan')):>14.0f}"
              f"{row.get('speedup', float('nan')):>9.2f}{row['dmoe']['step_latency_ms_p50']:>13.1f}"
              f"{(hm['step_latency_ms_p50'] if hm else float('nan')):>11.1f}")
    if report["ratio"]:
        r = report["ratio"]
        print(f"\nremote/local, one ffn expert, hidden {r['hidden']}, batch {r['batch']}: "
              f"remote {r['remote_samples_per_s']:.0f} s/s, local {r['local_served_step_samples_per_s']:.0f} s/s "
              f"-> ratio {r['ratio']:.3f}  (plain local train step {r['local_train_step_samples_per_s']:.0f} s/s, "
              f"ratio {r['ratio_vs_plain_train_step']:.3f})")
        print(f"remote without call ids (the node recomputes each forward, as before issue 13): "
              f"{r['remote_recompute_samples_per_s']:.0f} s/s, ratio to the plain local train step "
              f"{r['ratio_vs_plain_train_step_recompute']:.3f} (goal with call ids: >= 0.9); a kept forward holds "
              f"{r['kept_bytes_per_call'] / 2**20:.2f} MiB on the node until its backward")
        c = r["cpu_ms_per_sample"]
        local_cpu = min(x for x in (c["local_served"], c["local_served_passive"]) if x is not None)
        print(f"CPU per sample: local {local_cpu:.2f} ms, "
              f"remote (client + node) {c['remote']:.2f} ms -> CPU ratio {r['cpu_ratio']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
