"""dmoe's RemoteMixtureOfExperts vs hivemind's, on the same swarm shape, in one run.

    .venv/bin/python benchmarks/moe_layer.py --out runs/bench_moe_layer.json

Swarm: 2 expert servers on loopback splitting a 4x4 grid (8 experts each), ffn experts of
``--hidden-dim`` (dmoe's ``FeedForwardExpert`` on both sides: hivemind serves it as ``dmoe_ffn``
through benchmarks/hivemind_experts.py), Adam on the servers, one client layer with k_best=4.

* dmoe: two ``dmoe node`` processes; ``dmoe.RemoteMixtureOfExperts`` through ``dmoe.Swarm``.
* hivemind: two ``hivemind-server`` processes; ``hivemind.moe.RemoteMixtureOfExperts`` through
  a ``hivemind.DHT`` client.

Both with default settings (timeouts, batching, handlers). Servers run one at a time (the
other system's processes are stopped), so they never compete for the CPU.

Measured per batch size (median of ``--repeats`` steps after ``--warmup`` steps):
* search: the beam search alone (dmoe: inside forward, reported by the layer; hivemind:
  ``beam_search.batch_find_best_experts`` on the same scores, timed separately);
* forward: the whole ``layer(x)`` call (search included);
* backward: ``loss.backward()`` through the layer (remote Backward calls, servers apply Adam).

Freeze: one server is SIGSTOPped (whole process group: server, handlers, p2p daemon), then one
full training step (forward + backward) is timed with default settings; hivemind's step is given
up after ``--freeze-cap`` seconds (reported as ">cap"), then the server is resumed. For dmoe the
step right after (frozen node now banned) is timed too.

In-process: the same gate and 16 experts computed in the client's own process
(``dmoe.LocalMixtureOfExperts``, one torch thread, no network): the physical limit the remote layer is
compared with (the ``dmoe/in`` column).

Hedging (dmoe only): two ``dmoe node`` processes serve the *same* 16 experts (replicas); one of
them sits behind an emulated home link (``python -m dmoe.sim.links``, ``--slow-link-ms`` one way),
so it is slow but healthy. The same training steps run once with hedged calls disabled and once
enabled (``dmoe.config.HedgeOptions``); reported: forward and step p50/p95 and the extra calls
hedging spent.

Prints a table and writes JSON. Figures depend on the machine and its other load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GRID = (4, 4)
K_BEST = 4
HALVES = ("ffn.[0:2].[0:4]", "ffn.[2:4].[0:4]")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- dmoe


def run_dmoe(*, hidden: int, batches: list[int], warmup: int, repeats: int, logs: Path) -> dict[str, Any]:
    from dmoe import RemoteMixtureOfExperts, Swarm
    from dmoe.sim.launcher import DmoeProcess

    def node(experts: str, name: str, peers: list[str]) -> DmoeProcess:
        args = ["--experts", experts, "--hidden-dim", str(hidden), "--host", "127.0.0.1", "--port", "0",
                "--log-level", "WARNING", "--backward-rate", "0"]
        if peers:
            args += ["--initial-peers", *peers]
        return DmoeProcess("node", args, name=name, log_path=logs / f"dmoe_{name}.log").start()

    nodes = [node(HALVES[0], "a", [])]
    try:
        peers = nodes[0].wait_ready(120)["dht"]
        nodes.append(node(HALVES[1], "b", peers))
        nodes[1].wait_ready(120)
        swarm = Swarm(initial_peers=peers)
        try:
            layer = RemoteMixtureOfExperts(in_features=hidden, grid_size=GRID, uid_prefix="ffn", swarm=swarm,
                                           k_best=K_BEST)
            rows = []
            for batch in batches:
                search, forward, backward = [], [], []
                for i in range(warmup + repeats):
                    forward_s, backward_s = _train_step(layer, batch, hidden)
                    if i >= warmup:
                        search.append(layer.stats["last_search_seconds"])
                        forward.append(forward_s)
                        backward.append(backward_s)
                rows.append({"batch": batch, "search": _median(search), "forward": _median(forward),
                             "backward": _median(backward)})
                print(f"  dmoe batch {batch}: search {rows[-1]['search']:.4f}s forward {rows[-1]['forward']:.4f}s "
                      f"backward {rows[-1]['backward']:.4f}s", flush=True)

            def train_step() -> None:
                x = torch.randn(batches[-1], hidden, requires_grad=True)
                (layer(x).pow(2).mean() + 0.01 * layer.aux_loss).backward()

            nodes[1].freeze()
            frozen = _timed(train_step, cap=600.0)
            after = _timed(train_step, cap=600.0)
            nodes[1].resume()
            freeze = {"step_with_frozen_node": frozen, "next_step": after, "batch": batches[-1],
                      "settings": {"forward_timeout": layer.forward_timeout,
                                   "timeout_after_k_min": layer.timeout_after_k_min,
                                   "backward_timeout": layer.backward_timeout}}
            print(f"  dmoe frozen node: step {frozen:.2f}s, next step {after:.2f}s", flush=True)
            return {"rows": rows, "freeze": freeze, "layer_stats": layer.stats, "swarm_stats": _jsonable(swarm.stats)}
        finally:
            swarm.shutdown()
    finally:
        for proc in nodes:
            proc.stop(timeout=20)


def run_inprocess(*, hidden: int, batches: list[int], warmup: int, repeats: int) -> dict[str, Any]:
    """The physical limit of this machine: the same 16 experts and gate computed in the client's own process
    (``dmoe.LocalMixtureOfExperts``, one torch thread), the same training step, no network at all."""
    from dmoe.client.gating import LocalMixtureOfExperts
    from dmoe.dht.placement import grid_uids
    from dmoe.experts import create_expert

    experts = {uid: create_expert("ffn", hidden_dim=hidden, seed=0, uid=uid) for uid in grid_uids("ffn", GRID)}
    layer = LocalMixtureOfExperts(in_features=hidden, grid_size=GRID, uid_prefix="ffn", experts=experts,
                                  k_best=K_BEST)
    rows = []
    for batch in batches:
        forward, backward = [], []
        for i in range(warmup + repeats):
            forward_s, backward_s = _train_step(layer, batch, hidden)
            if i >= warmup:
                forward.append(forward_s)
                backward.append(backward_s)
        rows.append({"batch": batch, "forward": _median(forward), "backward": _median(backward)})
        print(f"  in-process batch {batch}: forward {rows[-1]['forward']:.4f}s backward {rows[-1]['backward']:.4f}s",
              flush=True)
    return {"rows": rows}


def _train_step(layer: Any, batch: int, hidden: int) -> tuple[float, float]:
    """One training step through ``layer``: (forward seconds, backward seconds)."""
    x = torch.randn(batch, hidden, requires_grad=True)
    t0 = time.perf_counter()
    y = layer(x)
    t1 = time.perf_counter()
    (y.pow(2).mean() + 0.01 * layer.aux_loss).backward()
    return t1 - t0, time.perf_counter() - t1


def _percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, int(round(q * len(xs))) - 1))] if xs else float("nan")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_hedging(*, hidden: int, batch: int, steps: int, warmup: int, link_ms: float, logs: Path) -> dict[str, Any]:
    """One replica of two behind a slow (not broken) link: steps with and without hedged calls."""
    from dmoe import RemoteMixtureOfExperts, Swarm
    from dmoe.config import HedgeOptions
    from dmoe.ready import parse_ready
    from dmoe.sim.launcher import DmoeProcess

    experts = "hd.[0:4].[0:4]"
    base = ["--experts", experts, "--hidden-dim", str(hidden), "--host", "127.0.0.1", "--log-level", "WARNING"]
    fast = DmoeProcess("node", [*base, "--port", "0"], name="hedge_fast", log_path=logs / "hedge_fast.log").start()
    inner, outer = _free_port(), _free_port()
    link = subprocess.Popen([sys.executable, "-m", "dmoe.sim.links", "--listen", str(outer), "--listen-host",
                             "127.0.0.1", "--target", f"127.0.0.1:{inner}", "--latency-ms", str(link_ms),
                             "--jitter-ms", "2", "--up-mbit", "20", "--down-mbit", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    slow = None
    try:
        for line in link.stdout:  # type: ignore[union-attr]
            if parse_ready(line):
                break
        peers = fast.wait_ready(120)["dht"]
        slow = DmoeProcess("node", [*base, "--port", str(inner), "--announce-port", str(outer),
                                    "--initial-peers", *peers], name="hedge_slow",
                           log_path=logs / "hedge_slow.log").start()
        slow.wait_ready(120)
        results = {}
        for mode in ("off", "on"):
            with Swarm(initial_peers=peers, hedge=HedgeOptions(enabled=mode == "on")) as swarm:
                layer = RemoteMixtureOfExperts(in_features=hidden, grid_size=GRID, uid_prefix="hd", swarm=swarm,
                                               k_best=K_BEST)
                forward, step = [], []
                for i in range(warmup + steps):
                    forward_s, backward_s = _train_step(layer, batch, hidden)
                    if i == warmup - 1:
                        calls_before, hedges_before = sum(swarm.stats["calls"].values()), swarm.stats["hedges"]
                        wins_before = swarm.stats["hedge_wins"]
                    if i >= warmup:
                        forward.append(forward_s)
                        step.append(forward_s + backward_s)
                stats = swarm.stats
                calls = sum(stats["calls"].values()) - calls_before
                hedges, wins = stats["hedges"] - hedges_before, stats["hedge_wins"] - wins_before
                results[mode] = {
                    "forward_p50": _median(forward), "forward_p95": _percentile(forward, 0.95),
                    "step_p50": _median(step), "step_p95": _percentile(step, 0.95),
                    "calls": calls, "hedges": hedges, "hedge_wins": wins,
                    "extra_calls": hedges / max(1, calls - hedges), "failures": stats["failures"],
                }
                r = results[mode]
                print(f"  hedging {mode}: forward p50 {r['forward_p50']:.4f}s p95 {r['forward_p95']:.4f}s, step p50 "
                      f"{r['step_p50']:.4f}s p95 {r['step_p95']:.4f}s, {hedges} hedges ({wins} won) of {calls} calls",
                      flush=True)
        return {"link_ms": link_ms, "batch": batch, "steps": steps, **results}
    finally:
        for proc in (slow, fast):
            if proc is not None:
                proc.stop(timeout=20)
        link.terminate()
        link.wait(10)


def _timed(fn: Callable[[], None], cap: float) -> float:
    """Seconds ``fn`` took; ``inf`` if still running after ``cap`` (left running in its thread)."""
    done = threading.Event()
    error: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # reported, the benchmark goes on
            error.append(e)
        finally:
            done.set()

    started = time.perf_counter()
    threading.Thread(target=target, daemon=True).start()
    finished = done.wait(cap)
    elapsed = time.perf_counter() - started
    if error:
        print(f"    (step raised {type(error[0]).__name__}: {error[0]})", flush=True)
    return elapsed if finished else float("inf")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------- hivemind


class HivemindServer:
    """``hivemind-server`` in its own session (so SIGSTOP reaches its handlers and p2p daemon)."""

    def __init__(self, uids: list[str], hidden: int, peers: list[str], log: Path) -> None:
        cmd = [sys.executable, "-m", "hivemind.hivemind_cli.run_server", "--expert_uids", *uids,
               "--expert_cls", "dmoe_ffn", "--custom_module_path", str(HERE / "hivemind_experts.py"),
               "--hidden_dim", str(hidden), "--optimizer", "adam"]
        if peers:
            cmd += ["--initial_peers", *peers]
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=tempfile.gettempdir(), env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.log_path = log

    def maddrs(self, timeout: float = 180.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"Running DHT node on (\[.*?\])", self.log_path.read_text(errors="replace"))
            if match:
                return [m for m in json.loads(match.group(1).replace("'", '"')) if "127.0.0.1" in m]
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"hivemind server did not start; log:\n{self.log_path.read_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
        self.signal(signal.SIGKILL)  # leftovers of the group
        self.log.close()


def run_hivemind(*, hidden: int, batches: list[int], warmup: int, repeats: int, logs: Path,
                 freeze_cap: float) -> dict[str, Any]:
    import hivemind
    from hivemind.moe.client.moe import RemoteMixtureOfExperts as HivemindMoE
    from hivemind.moe.server.dht_handler import get_experts

    from dmoe.dht.uids import parse_expert_pattern

    servers = [HivemindServer(parse_expert_pattern(HALVES[0]), hidden, [], logs / "hivemind_a.log")]
    dht = None
    try:
        peers = servers[0].maddrs()
        servers.append(HivemindServer(parse_expert_pattern(HALVES[1]), hidden, peers, logs / "hivemind_b.log"))
        servers[1].maddrs()
        dht = hivemind.DHT(initial_peers=peers, client_mode=True, start=True)
        all_uids = parse_expert_pattern(HALVES[0]) + parse_expert_pattern(HALVES[1])
        deadline = time.monotonic() + 120
        while not all(e is not None for e in get_experts(dht, all_uids)):
            if time.monotonic() > deadline:
                raise RuntimeError("hivemind experts never appeared in the DHT")
            time.sleep(0.5)
        layer = HivemindMoE(in_features=hidden, grid_size=GRID, dht=dht, uid_prefix="ffn.", k_best=K_BEST)
        rows = []
        for batch in batches:
            search, forward, backward = [], [], []
            for i in range(warmup + repeats):
                x = torch.randn(batch, hidden, requires_grad=True)
                with torch.no_grad():
                    scores = layer.proj(x).split_with_sizes(layer.beam_search.grid_size, dim=-1)
                t0 = time.perf_counter()
                layer.beam_search.batch_find_best_experts([s.numpy() for s in scores], K_BEST)
                t1 = time.perf_counter()
                y = layer(x)
                t2 = time.perf_counter()
                y.pow(2).mean().backward()
                t3 = time.perf_counter()
                if i >= warmup:
                    search.append(t1 - t0)
                    forward.append(t2 - t1)
                    backward.append(t3 - t2)
            rows.append({"batch": batch, "search": _median(search), "forward": _median(forward),
                         "backward": _median(backward)})
            print(f"  hivemind batch {batch}: search {rows[-1]['search']:.4f}s forward {rows[-1]['forward']:.4f}s "
                  f"backward {rows[-1]['backward']:.4f}s", flush=True)

        def train_step() -> None:
            x = torch.randn(batches[-1], hidden, requires_grad=True)
            layer(x).pow(2).mean().backward()

        servers[1].signal(signal.SIGSTOP)
        frozen = _timed(train_step, cap=freeze_cap)
        servers[1].signal(signal.SIGCONT)
        print(f"  hivemind frozen node: step {frozen:.2f}s" + (f" (gave up after {freeze_cap:.0f}s)"
                                                              if frozen == float("inf") else ""), flush=True)
        time.sleep(2.0)  # let a step that was left waiting drain now that the server is back
        settings = {"forward_timeout": layer.forward_timeout, "timeout_after_k_min": layer.timeout_after_k_min,
                    "backward_timeout": layer.backward_timeout}
        freeze = {"step_with_frozen_node": frozen, "cap": freeze_cap, "batch": batches[-1], "settings": settings}
        return {"rows": rows, "freeze": freeze}
    finally:
        if dht is not None:
            dht.shutdown()
        for server in servers:
            server.stop()


# ---------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hidden-dim", type=int, default=256, help="expert hidden size (ffn)")
    parser.add_argument("--batches", default="1,8,32,128", help="comma-separated batch sizes")
    parser.add_argument("--warmup", type=int, default=2, help="steps per batch size before measuring")
    parser.add_argument("--repeats", type=int, default=5, help="measured steps per batch size (median)")
    parser.add_argument("--freeze-cap", type=float, default=120.0,
                        help="seconds to wait for hivemind's step with a frozen server before giving up")
    parser.add_argument("--systems", default="dmoe,inprocess,hivemind,hedging", help="which parts to run")
    parser.add_argument("--slow-link-ms", type=float, default=30.0,
                        help="hedging: one-way latency of the slow replica's link, ms")
    parser.add_argument("--hedge-steps", type=int, default=60, help="hedging: measured steps per mode")
    parser.add_argument("--out", default="runs/bench_moe_layer.json", help="JSON report path")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the client is not the bottleneck we measure; servers share the 2 cores
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    report: dict[str, Any] = {
        "config": {"hidden": args.hidden_dim, "grid": GRID, "k_best": K_BEST, "servers": 2, "batches": batches,
                   "warmup": args.warmup, "repeats": args.repeats},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    with tempfile.TemporaryDirectory(prefix="dmoe-bench-") as tmp:
        logs = Path(tmp)
        systems = args.systems.split(",")
        if "dmoe" in systems:
            print("measuring dmoe ...", flush=True)
            report["dmoe"] = run_dmoe(hidden=args.hidden_dim, batches=batches, warmup=args.warmup,
                                      repeats=args.repeats, logs=logs)
        if "inprocess" in systems:
            print("measuring the same experts in-process ...", flush=True)
            report["inprocess"] = run_inprocess(hidden=args.hidden_dim, batches=batches, warmup=args.warmup,
                                                repeats=args.repeats)
        if "hedging" in systems:
            print("measuring hedging (one slow replica of two) ...", flush=True)
            report["hedging"] = run_hedging(hidden=args.hidden_dim, batch=32, steps=args.hedge_steps,
                                            warmup=args.warmup + 3, link_ms=args.slow_link_ms, logs=logs)
        if "hivemind" in systems:
            print("measuring hivemind ...", flush=True)
            report["hivemind"] = run_hivemind(hidden=args.hidden_dim, batches=batches, warmup=args.warmup,
                                              repeats=args.repeats, logs=logs, freeze_cap=args.freeze_cap)

    print(f"\nRemoteMixtureOfExperts, 2 servers, grid 4x4, k_best 4, ffn hidden {args.hidden_dim} "
          f"(median seconds)")
    header = f"{'batch':>6} | {'search dmoe':>11} {'hivemind':>9} | {'forward dmoe':>12} {'hivemind':>9} {'x':>6} " \
             f"{'in-proc':>8} {'dmoe/in':>7} | {'backward dmoe':>13} {'hivemind':>9} {'x':>6} {'in-proc':>8}"
    print(header)
    print("-" * len(header))
    dm = {r["batch"]: r for r in report.get("dmoe", {}).get("rows", [])}
    hm = {r["batch"]: r for r in report.get("hivemind", {}).get("rows", [])}
    ip = {r["batch"]: r for r in report.get("inprocess", {}).get("rows", [])}
    nan = {"search": float("nan"), "forward": float("nan"), "backward": float("nan")}
    for batch in batches:
        d, h, i = dm.get(batch, nan), hm.get(batch, nan), ip.get(batch, nan)
        print(f"{batch:>6} | {d['search']:>11.4f} {h['search']:>9.4f} | {d['forward']:>12.4f} {h['forward']:>9.4f} "
              f"{h['forward'] / d['forward']:>5.1f}x {i['forward']:>8.4f} {d['forward'] / i['forward']:>6.2f}x | "
              f"{d['backward']:>13.4f} {h['backward']:>9.4f} {h['backward'] / d['backward']:>5.1f}x "
              f"{i['backward']:>8.4f}")
    if ip:
        print("in-proc: the same 16 experts and gate in the client's own process, one thread (the physical limit); "
              "goal of issue 13: dmoe forward <= 1.5x of it at batch 8 and 128")
    if "dmoe" in report:
        f = report["dmoe"]["freeze"]
        print(f"\nfrozen server (SIGSTOP), one training step at batch {f['batch']}, default settings:")
        settings = f["settings"]
        print(f"  dmoe:     {f['step_with_frozen_node']:.2f} s (forward_timeout {settings['forward_timeout']:g} s, "
              f"timeout_after_k_min {settings['timeout_after_k_min']:g} s); next step {f['next_step']:.2f} s")
    if "hivemind" in report:
        f = report["hivemind"]["freeze"]
        shown = f"{f['step_with_frozen_node']:.2f} s" if f["step_with_frozen_node"] != float("inf") \
            else f"> {f['cap']:.0f} s (still waiting, gave up)"
        print(f"  hivemind: {shown} (forward_timeout {f['settings']['forward_timeout']}, "
              f"timeout_after_k_min {f['settings']['timeout_after_k_min']})")
    if "hedging" in report:
        h = report["hedging"]
        print(f"\nhedged calls: 2 replicas of every expert, one behind a {h['link_ms']:g} ms (one way) home link, "
              f"batch {h['batch']}, {h['steps']} steps (seconds)")
        print(f"{'hedging':>8} | {'forward p50':>11} {'p95':>7} | {'step p50':>8} {'p95':>7} | {'extra calls':>11}")
        for mode in ("off", "on"):
            r = h[mode]
            print(f"{mode:>8} | {r['forward_p50']:>11.4f} {r['forward_p95']:>7.4f} | {r['step_p50']:>8.4f} "
                  f"{r['step_p95']:>7.4f} | {100 * r['extra_calls']:>10.1f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
