"""Entrypoint of the dmoe image: ``ROLE [extra dmoe flags...]`` turns into the right ``dmoe`` command.

Roles:

* ``coordinator`` — ``dmoe coordinator`` on a fixed DHT port, announcing the container's address.
* ``node`` — shapes its own interface like a home line (``tc``, see home_link.py), starts the
  ``dmoe.sim.links`` emulator in front of its gRPC port for latency (and download rate when the kernel
  cannot police ingress), finds the coordinator's DHT address from its ``/status`` page, and runs
  ``dmoe node`` announcing the emulator's address (or, for the scenario's ``nat_share`` of the nodes,
  serving only through the coordinator's relay). Which experts it serves follows from its replica
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
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

# The chaos service partitions a node with SIGUSR1 and heals it with SIGUSR2, possibly a moment after
# starting its container: never let those signals' default action (terminate) hit us before the link
# emulator is there to receive them; remember the latest one instead (see run_node).
_link_signal: list[int] = []
for _sig in (signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(_sig, lambda sig, _frame: _link_signal.append(sig))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from home_link import apply_home_link  # noqa: E402

from dmoe.config.coordinator import DHT_PORT as COORDINATOR_DHT_PORT  # noqa: E402
from dmoe.config.coordinator import HTTP_PORT as COORDINATOR_HTTP_PORT  # noqa: E402
from dmoe.sim.scenario import Scenario, load_scenario  # noqa: E402
from dmoe.sim.swarm_layout import behind_nat, node_args, node_link, reachability_args, trainer_args  # noqa: E402

SCENARIO_DIRS = ("/opt/dmoe-scenarios/docker", "/opt/dmoe-scenarios")

NODE_GRPC_PORT = 7000  # announced (the link emulator's port)
NODE_INNER_PORT = 7001  # the node's own gRPC server, behind the emulator
NODE_DHT_PORT = 7100
METRICS_PORT = 9100


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


def _nameserver() -> str:
    try:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            if line.startswith("nameserver"):
                return line.split()[1]
    except (OSError, IndexError):
        pass
    return "127.0.0.11"  # Docker's embedded DNS on user-defined networks


def reverse_dns(ip: str, timeout: float = 2.0) -> str | None:
    """PTR lookup straight at the DNS server: /etc/hosts maps our IP to the container id, not its name."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in [*reversed(ip.split(".")), "in-addr", "arpa"]) + b"\0"
    query_id = os.getpid() & 0xFFFF
    packet = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 12, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(packet, (_nameserver(), 53))
            reply = sock.recv(2048)
        except OSError:
            return None
    rid, flags, _qd, answers = struct.unpack(">HHHH", reply[:8])
    if rid != query_id or flags & 0x000F or answers == 0:
        return None
    pos = 12 + len(qname) + 4  # skip the echoed question
    pos += 2 if reply[pos] & 0xC0 == 0xC0 else len(qname)  # answer name (usually a pointer)
    rtype, _cls, _ttl, rdlength = struct.unpack(">HHIH", reply[pos:pos + 10])
    if rtype != 12:
        return None
    labels, p = [], pos + 10
    while p < len(reply) and reply[p] and reply[p] & 0xC0 != 0xC0:
        labels.append(reply[p + 1:p + 1 + reply[p]].decode(errors="replace"))
        p += 1 + reply[p]
    return ".".join(labels) or None


def own_name() -> str:
    """Compose container name (``proj-node-3`` or ``proj_node_3``) via Docker's DNS, else the hostname."""
    name = reverse_dns(own_ip())
    return name.split(".")[0] if name else socket.gethostname()


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
    where = env("SWARM_COORDINATOR", f"coordinator:{env('SWARM_COORDINATOR_HTTP_PORT', str(COORDINATOR_HTTP_PORT))}")
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


def load_swarm_scenario() -> tuple[str, Scenario]:
    """SWARM_SCENARIO: a path, or a name in the image's scenario folders (default: ``compose``)."""
    name = env("SWARM_SCENARIO", "compose")
    candidates = [Path(name)] + [Path(d) / f"{name}.toml" for d in SCENARIO_DIRS]
    for path in candidates:
        if path.is_file():
            return str(path), load_scenario(path)
    sys.exit(f"entrypoint: scenario {name!r} not found (looked in {', '.join(SCENARIO_DIRS)})")


def placement_slots(scenario: Scenario) -> int:
    return int(env("SWARM_NODES", str(scenario.swarm.nodes)))


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
    _, scenario = load_swarm_scenario()
    peers = coordinator_peers(env_float("SWARM_WAIT_S", 180))
    log_dir = Path(env("SWARM_LOG_DIR", "/runs")) / "trainers"
    log_dir.mkdir(parents=True, exist_ok=True)
    exec_dmoe("train", ["--initial-peers", *peers, "--log-file", str(log_dir / f"{own_name()}.jsonl"),
                        "--no-progress", "--metrics-port", str(METRICS_PORT), *trainer_args(scenario), *extra])


def run_node(extra: list[str]) -> int:
    _, scenario = load_swarm_scenario()
    ip, name = own_ip(), own_name()
    index = replica_index(name)
    link = node_link(scenario, index)
    shaped = apply_home_link(dev=env("SWARM_LINK_DEV", "eth0"), up_mbit=link.up_mbit, down_mbit=link.down_mbit)
    say(f"{name} (node {index}) at {ip}: link {json.dumps(link.to_dict())}; tc {json.dumps(shaped.__dict__)}")
    checkpoints = Path(env("SWARM_CHECKPOINT_DIR", "/data/checkpoints"))
    wipe = Path(env("SWARM_LOG_DIR", "/runs")) / ".chaos" / f"{name}.wipe-checkpoint"
    if wipe.exists():  # the chaos service decided this node comes back without its checkpoint
        say(f"starting without checkpoint (removing {checkpoints})")
        shutil.rmtree(checkpoints, ignore_errors=True)
        wipe.unlink(missing_ok=True)
    peers = coordinator_peers(env_float("SWARM_WAIT_S", 180))
    # The emulator adds latency, jitter and drops, and shapes the rates tc could not (inf = tc does it).
    emulator = [sys.executable, "-m", "dmoe.sim.links", "--listen", str(NODE_GRPC_PORT),
                "--target", f"127.0.0.1:{NODE_INNER_PORT}",
                "--up-mbit", "inf" if shaped.up_mbit else str(link.up_mbit),
                "--down-mbit", "inf" if shaped.down_mbit else str(link.down_mbit),
                "--latency-ms", str(link.latency_ms), "--jitter-ms", str(link.jitter_ms),
                "--drop-prob", str(link.drop_prob), "--seed", str(scenario.seed * 1000 + index)]
    slots = placement_slots(scenario)
    # a node "behind NAT" (the scenario's nat_share) announces no address: it serves through the coordinator's
    # relay, whose connections enter through the emulator like everyone else's; the others are checked by dial-back
    route = reachability_args(scenario, index, link_address=f"127.0.0.1:{NODE_GRPC_PORT}", nodes=slots) \
        if behind_nat(scenario, index, slots) else []
    node = ["dmoe", "node", *node_args(scenario, index, slots),
            "--host", "0.0.0.0", "--port", str(NODE_INNER_PORT),
            "--announce-host", ip, "--announce-port", str(NODE_GRPC_PORT), *route,
            "--initial-peers", *peers,
            "--dht-host-maddrs", f"/ip4/0.0.0.0/tcp/{NODE_DHT_PORT}",
            "--dht-announce-maddrs", f"/ip4/{ip}/tcp/{NODE_DHT_PORT}",
            "--checkpoint-dir", str(checkpoints), "--metrics-port", str(METRICS_PORT), *extra]
    say("start " + " ".join(emulator))
    link_proc = subprocess.Popen(emulator, stdout=subprocess.PIPE)
    link_ready = threading.Event()
    threading.Thread(target=_pump, args=(link_proc, link_ready), daemon=True).start()
    say("start " + " ".join(node))
    children = [link_proc, subprocess.Popen(node)]

    def forward(sig: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    def to_link(sig: int, _frame: object) -> None:
        # The emulator installs its handlers before printing its ready line; until then, keep the signal.
        _link_signal.append(sig)
        if link_ready.is_set() and link_proc.poll() is None:
            link_proc.send_signal(_link_signal[-1])
            _link_signal.clear()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGUSR1, to_link)
    signal.signal(signal.SIGUSR2, to_link)
    link_ready.wait(60)
    if _link_signal and _link_signal[-1] == signal.SIGUSR1:  # partitioned while we were starting
        to_link(signal.SIGUSR1, None)
    _link_signal.clear()
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


def _pump(proc: subprocess.Popen[bytes], ready: threading.Event) -> None:
    """Copy a child's stdout to ours, setting ``ready`` at its ``dmoe-ready`` line."""
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        sys.stdout.buffer.write(line)
        sys.stdout.flush()
        if line.startswith(b"dmoe-ready "):
            ready.set()
    ready.set()  # EOF: it exited; nobody waits forever


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
        path, _ = load_swarm_scenario()
        exec_dmoe("chaos", [path, "--out", env("SWARM_LOG_DIR", "/runs"), *extra])
    else:
        os.execvp(role, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
