"""Entrypoint of the dmoe image: ``ROLE [extra dmoe flags...]`` turns into the right ``dmoe`` command.

Roles:

* ``coordinator`` — ``dmoe coordinator`` on a fixed DHT port, announcing the container's address.
* ``node`` — shapes its own interface like a home line (``tc``, see home_link.py), starts the
  ``dmoe.links`` emulator in front of its gRPC port for latency (and download rate when the kernel
  cannot police ingress), finds the coordinator's DHT address from its ``/status`` page, and runs
  ``dmoe node`` announcing the emulator's address. Which experts it serves follows from its replica
  number (the ``N`` in the compose container name ``<project>-node-N``, found by reverse DNS).
* ``trainer`` — finds the coordinator, runs ``dmoe train`` with its metrics log in ``$SWARM_LOG_DIR``.
* ``chaos`` — ``dmoe chaos`` (needs the Docker socket mounted).
* anything else is executed as given (``dmoe ...``, ``bash``).

Settings come from the environment (``SWARM_*`` here; every ``dmoe`` flag also reads ``DMOE_<FLAG>``):
everything below has a default, so ``docker compose up`` works without any.
Runs under ``init: true`` (tini as PID 1); the node role forwards SIGTERM/SIGINT to its children.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from home_link import apply_home_link  # noqa: E402

NODE_GRPC_PORT = 7000  # announced (the link emulator's port)
NODE_INNER_PORT = 7001  # the node's own gRPC server, behind the emulator
NODE_DHT_PORT = 7100
METRICS_PORT = 9100
COORDINATOR_DHT_PORT = 31337


def say(message: str) -> None:
    print(f"[entrypoint {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def env(name: str, default: str) -> str:
    return os.environ.get(name, "") or default


def env_float(name: str, default: float) -> float:
    text = env(name, str(default))
    try:
        return float(text)
    except ValueError:
        sys.exit(f"entrypoint: {name}={text!r} is not a number")


def own_ip() -> str:
    """The container's address on its (first) network: what peers must dial."""
    return socket.gethostbyname(socket.gethostname())


def own_name() -> str:
    """Compose container name (``proj-node-3`` or ``proj_node_3``) via Docker's DNS, else the hostname."""
    try:
        return socket.gethostbyaddr(own_ip())[0].split(".")[0]
    except OSError:
        return socket.gethostname()


def replica_index(name: str) -> int:
    """0-based replica number from a compose container name; SWARM_INDEX overrides."""
    if os.environ.get("SWARM_INDEX"):
        return int(os.environ["SWARM_INDEX"])
    m = re.search(r"[-_](\d+)$", name)
    if not m:
        sys.exit(f"entrypoint: cannot tell the replica number from container name {name!r}; set SWARM_INDEX")
    return int(m.group(1)) - 1


def coordinator_peers(timeout: float) -> list[str]:
    """DHT multiaddrs of the coordinator, from its /status page (DMOE_INITIAL_PEERS / SWARM_PEERS win)."""
    explicit = env("SWARM_PEERS", "")
    if explicit:
        return explicit.split()
    where = env("SWARM_COORDINATOR", f"coordinator:{env('SWARM_COORDINATOR_HTTP_PORT', '8470')}")
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{where}/status", timeout=5) as resp:
                about = json.load(resp).get("coordinator", {})
            maddrs = [m for m in about.get("dht", []) if "/ip4/127." not in m]
            if maddrs:
                return maddrs
            last = "no DHT addresses in /status yet"
        except (OSError, ValueError) as e:
            last = str(e)
        time.sleep(1.0)
    sys.exit(f"entrypoint: coordinator at {where} did not answer /status within {timeout:.0f}s ({last})")


def expert_pattern(index: int) -> str:
    """This node's ``--experts``: SWARM_NODE_EXPERTS with {index}, {start}, {stop} filled in."""
    per_node = int(env("SWARM_EXPERTS_PER_NODE", "4"))
    template = env("SWARM_NODE_EXPERTS", "ffn.{index}.[0:4]")
    return template.format(index=index, start=index * per_node, stop=(index + 1) * per_node)


def exec_dmoe(role: str, args: list[str]) -> None:
    cmd = ["dmoe", role, *args]
    say("exec " + " ".join(cmd))
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)


def run_coordinator(extra: list[str]) -> None:
    ip = own_ip()
    exec_dmoe("coordinator", [
        "--identity", env("SWARM_IDENTITY", "/data/coordinator.key"),
        "--host-maddrs", f"/ip4/0.0.0.0/tcp/{COORDINATOR_DHT_PORT}",
        "--announce-maddrs", f"/ip4/{ip}/tcp/{COORDINATOR_DHT_PORT}",
        *extra,
    ])


def run_trainer(extra: list[str]) -> None:
    peers = coordinator_peers(env_float("SWARM_WAIT_S", 180))
    log_dir = Path(env("SWARM_LOG_DIR", "/runs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    name = own_name()
    exec_dmoe("train", ["--initial-peers", *peers, "--log-file", str(log_dir / f"{name}.jsonl"), *extra])


def run_node(extra: list[str]) -> int:
    ip, name = own_ip(), own_name()
    index = replica_index(name)
    up, down = env_float("SWARM_LINK_UP_MBIT", 20.0), env_float("SWARM_LINK_DOWN_MBIT", 100.0)
    latency, jitter = env_float("SWARM_LINK_LATENCY_MS", 20.0), env_float("SWARM_LINK_JITTER_MS", 0.0)
    link = apply_home_link(dev=env("SWARM_LINK_DEV", "eth0"), up_mbit=up, down_mbit=down)
    say(f"{name} (replica {index}) at {ip}: tc link {json.dumps(link.__dict__)}")
    peers = coordinator_peers(env_float("SWARM_WAIT_S", 180))
    # the emulator adds latency, and shapes what tc could not (inf = leave it to tc)
    emu_up = "inf" if link.up_mbit else str(up)
    emu_down = "inf" if link.down_mbit else str(down)
    emulator = [sys.executable, "-m", "dmoe.links", "--listen", str(NODE_GRPC_PORT),
                "--target", f"127.0.0.1:{NODE_INNER_PORT}", "--up-mbit", emu_up, "--down-mbit", emu_down,
                "--latency-ms", str(latency), "--jitter-ms", str(jitter)]
    node = ["dmoe", "node", "--experts", expert_pattern(index),
            "--host", "0.0.0.0", "--port", str(NODE_INNER_PORT),
            "--announce-host", ip, "--announce-port", str(NODE_GRPC_PORT),
            "--initial-peers", *peers,
            "--dht-host-maddrs", f"/ip4/0.0.0.0/tcp/{NODE_DHT_PORT}",
            "--dht-announce-maddrs", f"/ip4/{ip}/tcp/{NODE_DHT_PORT}",
            "--checkpoint-dir", env("SWARM_CHECKPOINT_DIR", "/data/checkpoints"),
            "--metrics-port", str(METRICS_PORT), *extra]
    say("start " + " ".join(emulator))
    children = [subprocess.Popen(emulator)]
    say("start " + " ".join(node))
    children.append(subprocess.Popen(node))

    def forward(sig: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # Whichever child ends first ends the container: a node without its link (or a link without
    # its node) is not a working home node, and the chaos service restarts the whole container.
    while all(child.poll() is None for child in children):
        time.sleep(0.5)
    code = next(child.returncode for child in children if child.poll() is not None)
    forward(signal.SIGTERM, None)
    for child in children:
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
    return code


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    role, extra = argv[0], argv[1:]
    if role == "coordinator":
        run_coordinator(extra)
    elif role == "trainer":
        run_trainer(extra)
    elif role == "node":
        return run_node(extra)
    elif role == "chaos":
        exec_dmoe("chaos", extra)
    else:
        os.execvp(role, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
