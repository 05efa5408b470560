"""The ``netns`` test helper really builds a home-behind-NAT network, and always tears it down.

Checked with real TCP listeners inside the namespaces: the public side cannot dial the home node
(no route to the private subnet) although the router can, the home node reaches the public side
through the NAT, and the public side sees such connections coming from the router's public address.
Afterwards (also when the body raised) none of the namespaces, and no veth in the root namespace, is left.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from netns import NatTopology, list_namespaces, nat_topology, netns_available

pytestmark = pytest.mark.integration

PORT = 7411

# listens on 0.0.0.0:PORT, prints "ready", then prints the peer address of every accepted connection
_LISTENER = (
    "import socket, sys\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen()\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    conn, peer = s.accept(); print(peer[0], flush=True); conn.close()\n"
)


def _readline(proc: subprocess.Popen[str], timeout: float = 5.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from listener within {timeout}s"
    return proc.stdout.readline().strip()


@contextmanager
def _listener(topo: NatTopology, ns: str) -> Iterator[subprocess.Popen[str]]:
    proc = topo.popen(ns, sys.executable, "-I", "-c", _LISTENER, str(PORT),
                      stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert _readline(proc) == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=5)


def _root_links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout


def _skip_unless_available() -> None:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)


def test_home_behind_nat_reaches_public_but_not_vice_versa():
    _skip_unless_available()
    started = time.monotonic()
    with nat_topology() as topo:
        names = topo.namespaces
        assert set(names) <= list_namespaces()
        veths = [dev for devs in topo.links.values() for dev in devs.split()]
        assert all(len(dev) <= 15 for dev in veths)
        assert not any(dev in _root_links() for dev in veths), "a veth end lives in the root namespace"

        with _listener(topo, topo.home), _listener(topo, topo.public) as public_listener:
            # the home listener is reachable from the router, so the public side's failure is the NAT's doing
            assert topo.can_connect(topo.router, topo.home_ip, PORT)
            assert not topo.can_connect(topo.public, topo.home_ip, PORT)

            assert topo.can_connect(topo.home, topo.public_ip, PORT)
            assert _readline(public_listener) == topo.router_public_ip

            # loopback works inside the namespaces too
            assert topo.can_connect(topo.public, "127.0.0.1", PORT)
            assert _readline(public_listener) == "127.0.0.1"

    assert not set(names) & list_namespaces()
    assert not any(dev in _root_links() for dev in veths)
    assert time.monotonic() - started < 30


def test_cleanup_when_body_raises():
    _skip_unless_available()

    class Boom(Exception):
        pass

    names: tuple[str, ...] = ()
    sleeper: subprocess.Popen[bytes] | None = None
    with pytest.raises(Boom):
        with nat_topology(prefix="dmoeboom") as topo:
            names = topo.namespaces
            # a process left running inside a namespace must not keep it alive
            sleeper = topo.popen(topo.home, "sleep", "60", stdin=subprocess.DEVNULL)
            for _ in range(200):  # `ip netns exec` enters the namespace, then execs: wait until it is in there
                if str(sleeper.pid) in subprocess.run(["ip", "netns", "pids", topo.home], capture_output=True,
                                                      text=True).stdout.split():
                    break
                time.sleep(0.05)
            assert set(names) <= list_namespaces()
            raise Boom
    assert len(names) == 3
    assert not set(names) & list_namespaces()
    assert sleeper is not None and sleeper.wait(timeout=5) == -9  # killed by the cleanup
