"""``dmoe coordinator`` end to end: real coordinator and node processes, real DHT, real HTTP, real signals.

One module-scoped swarm (coordinator A, coordinator B bootstrapped from A, three nodes joined through A)
serves the read-only checks; tests that kill or restart things start their own processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dmoe.sim.launcher import DmoeProcess

TTL = 6.0  # --announce-ttl of the nodes (s)
REFRESH = 0.5  # --refresh-period of the coordinators (s)
NODE_EXPERTS = {"n0": "ffn.[0:2].[0:4]", "n1": "ffn.[0:2].[0:4]", "n2": "ffn.[2:4].[0:4]"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def coordinator_args(identity: Path, *extra: str, dht_port: int = 0) -> list[str]:
    return ["--identity", str(identity), "--host-maddrs", f"/ip4/127.0.0.1/tcp/{dht_port}", "--http-host",
            "127.0.0.1", "--http-port", "0", "--relay-host", "127.0.0.1", "--relay-port", "0", "--refresh-period",
            str(REFRESH), *extra]


def node_args(experts: str, initial_peers: list[str]) -> list[str]:
    return ["--experts", experts, "--expert-cls", "ffn", "--hidden-dim", "32", "--host", "127.0.0.1", "--port", "0",
            "--announce-ttl", str(TTL), "--initial-peers", *initial_peers]


def get(proc: DmoeProcess, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://{proc.ready['http']}{path}", timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def status(proc: DmoeProcess) -> dict[str, Any]:
    code, ctype, body = get(proc, "/status")
    assert code == 200 and ctype.startswith("application/json")
    return json.loads(body)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def node_ids(proc: DmoeProcess) -> set[str]:
    return {n["node_id"] for n in status(proc)["nodes"]}


def start(name: str, subcommand: str, args: list[str], logs: Path, started: list[DmoeProcess]) -> DmoeProcess:
    proc = DmoeProcess(subcommand, args, name=name, log_path=logs / f"{name}.log")
    started.append(proc.start())
    return proc


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("swarm")
    started: list[DmoeProcess] = []
    try:
        a = start("coord_a", "coordinator", coordinator_args(tmp / "a.key"), tmp, started)
        a.wait_ready(60)
        b = start("coord_b", "coordinator", coordinator_args(tmp / "b.key", "--initial-peers", *a.ready["dht"]),
                  tmp, started)
        nodes = {name: start(name, "node", node_args(experts, a.ready["dht"]), tmp, started)
                 for name, experts in NODE_EXPERTS.items()}
        b.wait_ready(60)
        for proc in nodes.values():
            proc.wait_ready(120)
        ids = {proc.ready["node_id"] for proc in nodes.values()}
        wait_for(lambda: node_ids(a) >= ids, 30, "coordinator A to see the three nodes")
        yield {"a": a, "b": b, "nodes": nodes, "tmp": tmp}
    finally:
        for proc in started:  # SIGTERM all at once, so they shut down in parallel
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(started):
            proc.stop(timeout=15)


@pytest.mark.integration
def test_status_lists_nodes_and_their_experts(swarm):
    st = status(swarm["a"])
    assert st["coordinator"]["dht"] == swarm["a"].ready["dht"]
    by_id = {n["node_id"]: n for n in st["nodes"]}
    for proc in swarm["nodes"].values():
        node = by_id[proc.ready["node_id"]]
        assert node["endpoint"] == proc.ready["announced"]
        assert sorted(node["experts"]) == sorted(proc.ready["experts"])
        assert node["num_experts"] == len(proc.ready["experts"])
        assert 0 <= node["last_seen_s"] < TTL and node["expires_in_s"] > 0
    ffn = st["prefixes"]["ffn"]
    assert ffn["alive"] == 16 and ffn["grid"] == [[0, 4], [0, 4]] and ffn["coverage"] == 1.0
    # n0 and n1 both serve ffn.[0:2].*: two replicas each; ffn.[2:4].* has one (n2)
    n0, n1, n2 = (swarm["nodes"][k].ready["announced"] for k in ("n0", "n1", "n2"))
    assert sorted(e["endpoint"] for e in ffn["experts"]["ffn.1.3"]) == sorted([n0, n1])
    assert [e["endpoint"] for e in ffn["experts"]["ffn.3.0"]] == [n2]
    assert ffn["replicas_min"] == 1 and ffn["replicas_max"] == 2
    assert ffn["replication"]["ffn.1.3"] == 2 and ffn["replication"]["ffn.3.0"] == 1
    assert ffn["at_risk"] == [f"ffn.{i}.{j}" for i in (2, 3) for j in range(4)] and ffn["unserved"] == []
    assert st["experts_at_risk"] == 8 and st["experts_unserved"] == 0
    assert st["replication_histogram"] == {"1": 8, "2": 8}
    assert st["counters"]["refresh_errors"] == 0 and st["counters"]["refreshes"] > 0


@pytest.mark.integration
def test_second_coordinator_bootstrapped_from_the_first_sees_the_same_swarm(swarm):
    ids = {proc.ready["node_id"] for proc in swarm["nodes"].values()}
    wait_for(lambda: node_ids(swarm["b"]) == ids, 30, "coordinator B to see the nodes that joined through A")
    assert status(swarm["b"])["prefixes"]["ffn"]["alive"] == 16


@pytest.mark.integration
def test_metrics_parse_with_the_prometheus_parser(swarm):
    code, ctype, body = get(swarm["a"], "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}

    def value(name: str, **labels: str) -> float:
        samples = [s for s in families[name].samples if all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(samples) == 1, (name, labels, families[name].samples)
        return samples[0].value

    assert value("dmoe_swarm_nodes") == 3
    assert value("dmoe_swarm_experts_alive", prefix="ffn") == 16
    assert value("dmoe_swarm_grid_cells", prefix="ffn") == 16
    assert value("dmoe_swarm_grid_coverage_ratio", prefix="ffn") == 1.0
    assert value("dmoe_swarm_expert_replicas", prefix="ffn", uid="ffn.0.2") == 2
    assert value("dmoe_swarm_expert_replicas", prefix="ffn", uid="ffn.2.2") == 1
    n2 = swarm["nodes"]["n2"].ready
    assert value("dmoe_swarm_node_experts", node_id=n2["node_id"], endpoint=n2["announced"]) == 8
    assert value("dmoe_swarm_dht_peers") >= 3
    assert families["dmoe_swarm_refreshes"].type == "counter" and value("dmoe_swarm_refreshes") > 0
    assert "process_resident_memory_bytes" in families


@pytest.mark.integration
def test_http_errors_are_clean(swarm):
    assert get(swarm["a"], "/nope")[0] == 404
    request = urllib.request.Request(f"http://{swarm['a'].ready['http']}/status", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 405
    host, port = swarm["a"].ready["http"].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # garbage instead of HTTP
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert status(swarm["a"])["nodes"]  # and it still serves everyone else


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and apt-get is unavailable to install Debian's chromium")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
                   check=True, env=env, capture_output=True, timeout=900)
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


def _headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,800",
         "--virtual-time-budget=4000", *args],
        capture_output=True, timeout=120,
    )


@pytest.mark.integration
def test_page_renders_node_table_in_headless_chromium(swarm, tmp_path):
    from PIL import Image

    chromium = _chromium()
    url = f"http://{swarm['a'].ready['http']}/"
    dom = _headless(chromium, tmp_path / "profile-dom", "--dump-dom", url)
    html = dom.stdout.decode(errors="replace")
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    # rows exist only after the page's script fetched /status and rendered it
    for proc in swarm["nodes"].values():
        assert f'class="node-row" data-node-id="{proc.ready["node_id"]}"' in html
        assert proc.ready["announced"] in html
    # grid map: one cell per expert, classed by replica count (the legend has no data-uid)
    assert html.count('class="cell r2" data-uid=') == 8 and html.count('class="cell r1" data-uid=') == 8
    assert html.count('class="risky" data-uid=') == 8  # ffn.[2:4].* have one holder (n2)

    png = tmp_path / "page.png"
    shot = _headless(chromium, tmp_path / "profile-shot", f"--screenshot={png}", url)
    assert shot.returncode == 0 and png.exists(), shot.stderr.decode(errors="replace")[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 800)
    colors = image.getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 50, "screenshot looks blank"
    pixels = {rgb for _, rgb in colors}
    assert (0xEF, 0xEF, 0xF2) in pixels, "node table header not drawn"  # table.nodes th background
    assert (0x4C, 0xAE, 0x5A) in pixels and (0x9F, 0xD8, 0xA4) in pixels, "grid map cells not drawn"


@pytest.mark.integration
def test_sigkilled_node_disappears_within_one_ttl(swarm):
    a, tmp = swarm["a"], swarm["tmp"]
    extra = DmoeProcess("node", node_args("ffn.[4:5].[0:4]", a.ready["dht"]), name="n_killed",
                        log_path=tmp / "n_killed.log").start()
    try:
        ready = extra.wait_ready(120)
        wait_for(lambda: ready["node_id"] in node_ids(a), 30, "the extra node to show up")
        assert status(a)["prefixes"]["ffn"]["alive"] == 20
        extra.kill()
        killed_at = time.monotonic()
        wait_for(lambda: ready["node_id"] not in node_ids(a), TTL + REFRESH + 10, "the killed node to vanish")
        elapsed = time.monotonic() - killed_at
    finally:
        extra.stop()
    # its record expires at most one TTL after its last announcement, which came before the kill;
    # allow one refresh period plus lookup time on a busy machine
    assert elapsed <= TTL + REFRESH + 2.0, f"took {elapsed:.1f}s, TTL is {TTL}s"
    st = status(a)
    assert {n["node_id"] for n in st["nodes"]} == {p.ready["node_id"] for p in swarm["nodes"].values()}
    assert st["prefixes"]["ffn"]["alive"] == 16
    assert ready["node_id"] in [g["id"] for g in st["gone"]["nodes"]]
    assert {g["id"] for g in st["gone"]["experts"]} == {f"ffn.4.{j}" for j in range(4)}
    assert st["counters"]["expert_disappearances"]["ffn"] >= 4


@pytest.mark.integration
def test_restart_keeps_identity_and_nodes_reconnect(launch, tmp_path):
    identity = tmp_path / "coordinator.key"
    args = coordinator_args(identity, dht_port=free_port())
    coord = launch("coordinator", args, name="coord")
    maddrs, peer_id = coord.ready["dht"], coord.ready["peer_id"]
    assert all(m.endswith(f"/p2p/{peer_id}") for m in maddrs)
    node = launch("node", node_args("ffn.[0:1].[0:2]", maddrs), name="node", timeout=120)
    wait_for(lambda: node.ready["node_id"] in node_ids(coord), 30, "the node in the coordinator's view")

    # crash: the identity and the peers saved while running are all the new process has
    peers_file = Path(f"{identity}.peers.json")
    node_peer_id = node.ready["dht"][0].rsplit("/p2p/", 1)[1]
    wait_for(lambda: peers_file.exists() and node_peer_id in peers_file.read_text(), 15,
             "the node's address in the known-peers file")
    coord.kill()
    coord = launch("coordinator", args, name="coord_after_crash")
    assert coord.ready["dht"] == maddrs and coord.ready["peer_id"] == peer_id
    wait_for(lambda: node.ready["node_id"] in node_ids(coord), 30, "the node to reconnect after a crash")

    # graceful: SIGTERM exits 0, and the next start is again at the same address
    coord.send_signal(signal.SIGTERM)
    assert coord.proc.wait(20) == 0
    coord = launch("coordinator", args, name="coord_after_stop")
    assert coord.ready["dht"] == maddrs
    wait_for(lambda: node.ready["node_id"] in node_ids(coord), 30, "the node to reconnect after a restart")
    assert node.alive()


def _run_coordinator(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmoe", "coordinator", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.integration
def test_corrupt_identity_is_one_line_and_nonzero(tmp_path):
    corrupt = tmp_path / "corrupt.key"
    corrupt.write_bytes(b"this is not a libp2p private key")
    result = _run_coordinator(*coordinator_args(corrupt))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "identity file" in lines[0] and "corrupt" in lines[0], result.stderr
    assert corrupt.read_bytes() == b"this is not a libp2p private key"  # never replaced behind our back



def test_unreadable_identity_is_one_line_and_nonzero(tmp_path, capsys):
    from dmoe.cli import main

    a_directory = tmp_path / "dir.key"
    a_directory.mkdir()
    assert main(["coordinator", *coordinator_args(a_directory)]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"cannot read identity file {a_directory}" in lines[0], lines


@pytest.mark.integration
def test_taken_http_port_is_one_line_and_nonzero(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = coordinator_args(tmp_path / "c.key")
        args[args.index("--http-port") + 1] = str(port)
        result = _run_coordinator(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1 and f"cannot bind HTTP port 127.0.0.1:{port}" in lines[0], result.stderr
    assert "dmoe-ready" not in result.stdout


@pytest.mark.integration
def test_bad_flags_exit_2_with_a_one_line_reason(tmp_path, capsys):
    from dmoe.cli import main

    for bad in (["--prefixes", "ffn.[3:1]"], ["--initial-peers", "/ip4/127.0.0.1/tcp/5"], ["--http-port", "70000"],
                ["--refresh-period", "0"], ["--host-maddrs", "not-a-maddr"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["coordinator", *coordinator_args(tmp_path / "c.key"), *bad])
        assert exit_info.value.code == 2, bad
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"dmoe coordinator: argument {bad[0]}"), err
    assert not (tmp_path / "c.key").exists()  # nothing was started
