"""Test helper: a real "home behind a NAT router" network built from Linux network namespaces.

``nat_topology()`` creates three namespaces joined by two veth pairs::

    public  10.200.N.1 <--veth--> 10.200.N.2  router  192.168.N.1 <--veth--> 192.168.N.2  home
    (coordinator, relays,           (ip_forward=1, MASQUERADE out          (the NATed node; default
     trainer run here)               of its public-side veth)               route via 192.168.N.1)

The public side has only its connected 10.200.N.0/24 route, so it cannot dial the home node, while
connections from home to the public side leave the router masqueraded: the public side sees them
coming from the router's public address (10.200.N.2), exactly like a peer behind a home router.

Design points:

* Nothing is created in the root namespace. Both veth pairs are created with both ends placed
  directly in their target namespaces (``ip link add A netns X type veth peer name B netns Y``),
  and all iptables rules and sysctls are set inside the router namespace. Deleting the three
  namespaces therefore removes every veth and rule; the host's network is never touched.
* Cleanup always runs (``try``/``finally``, so also on exceptions, ``KeyboardInterrupt`` and
  pytest-timeout's SIGALRM), covers a half-built topology, is idempotent and never raises. Any
  process still running inside one of our namespaces is killed (by pid, from ``ip netns pids``)
  first, since a namespace, and its veths, only disappear once no process is left in it.
* Names are unique per run (prefix + random hex suffix), and N is derived from the pid and a
  per-process counter, so parallel pytest-xdist workers and nested topologies never collide. (The
  subnets could not clash anyway: each namespace has its own routing table; distinct N only makes
  logs and packet captures easier to tell apart.)
* Interface names are at most 13 characters (Linux allows 15).

Commands run as ``ip netns exec NS ...``, which execs, so a ``Popen`` pid is the pid of the
program inside the namespace (what ``DmoeProcess(netns=...)`` in ``dmoe.sim.launcher`` relies on).
``netns_available()`` says whether all this works here (root, iproute2, iptables with NAT support).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_SEQ = itertools.count()

# probe (run in the target namespace) for ``can_connect``: exit 0 iff a TCP connection succeeds
_CONNECT_PROBE = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()\n"
    "except OSError:\n"
    "    sys.exit(1)\n"
)


class NetnsCommandError(subprocess.CalledProcessError):
    """A command failed; unlike ``CalledProcessError`` its message includes the command's stderr."""

    def __str__(self) -> str:
        stderr = (self.stderr or "").strip()
        return super().__str__() + (f": {stderr}" if stderr else "")


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise NetnsCommandError(result.returncode, result.args, result.stdout, result.stderr)
    return result


def _exec_in(ns: str, cmd: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def list_namespaces() -> set[str]:
    """Names of the existing named network namespaces (``ip netns list``)."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def delete_namespace(ns: str) -> None:
    """Kill whatever still runs inside ``ns``, then delete it. Idempotent; never raises."""
    try:
        if ns not in list_namespaces():
            return
        deadline = time.monotonic() + 3.0
        while True:
            pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split() if p.isdigit()]
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        _run(["ip", "netns", "del", ns], check=False)
    except Exception:  # noqa: BLE001 - cleanup must never mask the test's own outcome
        pass


@dataclass
class NatTopology:
    """A built topology: namespace names, addresses, and helpers that run things inside it."""

    public: str  # netns of the "internet" side (coordinator/relays/trainer run here)
    router: str  # netns of the NAT router
    home: str  # netns of the home LAN (the NATed node runs here)
    public_ip: str  # the public side's address, 10.200.N.1
    router_public_ip: str  # the router's public-side address, 10.200.N.2: the source of NATed traffic
    home_ip: str  # the home machine's private address, 192.168.N.2
    router_home_ip: str = ""  # the router's home-side address (home's gateway), 192.168.N.1
    links: dict[str, str] = field(default_factory=dict)  # netns name -> veth names inside it (space-separated)

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.public, self.router, self.home)

    def run(self, ns: str, *cmd: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside namespace ``ns``; text output captured. Raises ``NetnsCommandError`` if check."""
        return _run(_exec_in(ns, cmd), check=check, timeout=timeout)

    def popen(self, ns: str, *cmd: str, **kwargs: Any) -> subprocess.Popen:
        """Start ``cmd`` inside namespace ``ns`` (``Popen`` kwargs pass through); the pid is the program's."""
        return subprocess.Popen(_exec_in(ns, cmd), **kwargs)

    def can_connect(self, ns: str, host: str, port: int, timeout: float = 2.0) -> bool:
        """Whether a TCP connection to ``host:port`` succeeds when made from inside namespace ``ns``."""
        cmd = [sys.executable, "-I", "-c", _CONNECT_PROBE, host, str(port), str(timeout)]
        try:
            return self.run(ns, *cmd, check=False, timeout=timeout + 10).returncode == 0
        except subprocess.TimeoutExpired:
            return False


def _wait_links_up(topo: NatTopology, timeout: float = 3.0) -> None:
    """Wait until every veth end reports carrier (both ends of a pair must be up)."""
    deadline = time.monotonic() + timeout
    for ns, names in topo.links.items():
        for dev in names.split():
            while "LOWER_UP" not in topo.run(ns, "ip", "-o", "link", "show", "dev", dev).stdout:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"veth {dev} in {ns} did not come up within {timeout}s")
                time.sleep(0.02)


@contextmanager
def nat_topology(prefix: str = "dmoe") -> Iterator[NatTopology]:
    """Build public <-> router (NAT) <-> home namespaces; always remove them on exit.

    ``prefix`` (letters, digits, ``_``, ``-``) starts every namespace and interface name.
    """
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"netns prefix must match {_PREFIX_RE.pattern}: {prefix!r}")
    suffix = secrets.token_hex(3)
    n = 1 + (os.getpid() + next(_SEQ)) % 254
    base = f"{prefix}-{suffix}"
    short = f"{prefix[:5]}{suffix}"  # <= 11 chars; + 2 below keeps interface names <= 13
    pub_if, rpub_if, rhome_if, home_if = f"{short}pu", f"{short}rp", f"{short}rh", f"{short}ho"
    topo = NatTopology(
        public=f"{base}-public",
        router=f"{base}-router",
        home=f"{base}-home",
        public_ip=f"10.200.{n}.1",
        router_public_ip=f"10.200.{n}.2",
        home_ip=f"192.168.{n}.2",
        router_home_ip=f"192.168.{n}.1",
    )
    topo.links = {topo.public: pub_if, topo.router: f"{rpub_if} {rhome_if}", topo.home: home_if}
    try:
        for ns in topo.namespaces:
            _run(["ip", "netns", "add", ns])
            topo.run(ns, "ip", "link", "set", "lo", "up")
        # both ends created directly inside their namespaces: nothing ever lives in the root ns
        _run(["ip", "link", "add", pub_if, "netns", topo.public, "type", "veth", "peer", "name", rpub_if,
              "netns", topo.router])
        _run(["ip", "link", "add", home_if, "netns", topo.home, "type", "veth", "peer", "name", rhome_if,
              "netns", topo.router])

        topo.run(topo.public, "ip", "addr", "add", f"{topo.public_ip}/24", "dev", pub_if)
        topo.run(topo.router, "ip", "addr", "add", f"{topo.router_public_ip}/24", "dev", rpub_if)
        topo.run(topo.router, "ip", "addr", "add", f"{topo.router_home_ip}/24", "dev", rhome_if)
        topo.run(topo.home, "ip", "addr", "add", f"{topo.home_ip}/24", "dev", home_if)
        for ns, names in topo.links.items():
            for dev in names.split():
                topo.run(ns, "ip", "link", "set", dev, "up")

        topo.run(topo.home, "ip", "route", "add", "default", "via", topo.router_home_ip)
        topo.run(topo.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        topo.run(topo.router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", rpub_if, "-j", "MASQUERADE")
        # public: deliberately only its connected 10.200.N.0/24 route, no way to 192.168.N.0/24
        _wait_links_up(topo)
        yield topo
    finally:
        for ns in reversed(topo.namespaces):
            delete_namespace(ns)


@functools.cache
def netns_available() -> str | None:
    """``None`` if root, ``ip netns``, veths and iptables NAT work here; else a one-line reason to skip."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables", "sysctl"):
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH"
    probe = f"dmoeprobe-{secrets.token_hex(3)}"
    try:
        _run(["ip", "netns", "add", probe])
        _run(_exec_in(probe, ["ip", "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"]))
        _run(_exec_in(probe, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))
        _run(_exec_in(probe, ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "probe0", "-j", "MASQUERADE"]))
    except (OSError, subprocess.SubprocessError) as exc:
        return f"network namespaces unusable here: {' '.join(str(exc).split())}"
    finally:
        delete_namespace(probe)
    return None
