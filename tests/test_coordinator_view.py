"""The coordinator's parts in one process: swarm view over real hivemind DHT peers, HTTP server, identity.

Records are announced with ``ExpertRegistry.announce`` from real DHT peers (each with its own p2pd), the
way nodes announce; the view reads them back through a separate DHT peer, as the coordinator does.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from dmoe.coordinator.bootstrap import (
    CoordinatorStartError,
    load_or_create_identity,
    read_known_peers,
    write_known_peers,
)
from dmoe.coordinator.http import HttpServer, Response
from dmoe.coordinator.page import PAGE_HTML
from dmoe.coordinator.swarm_metrics import make_registry
from dmoe.coordinator.view import PrefixSpec, SwarmView, parse_prefixes
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dmoe.dht.access import InLoopDHT
from dmoe.dht.registry import ExpertEndpoint, ExpertRegistry, NodeRecord
from dmoe.errors import ConfigError


async def _peer(initial_peers: list[str] | None = None) -> InLoopDHT:
    """A DHT peer with its own signing key (the default key is per process, and these stand for separate nodes)."""
    validator = RSASignatureValidator(RSAPrivateKey())
    node = await DHTNode.create(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                record_validator=validator)
    return InLoopDHT(node, validator)


async def _swarm(n_peers: int) -> tuple[InLoopDHT, list[InLoopDHT]]:
    observer = await _peer()
    maddrs = await observer.visible_maddrs()
    peers = list(await asyncio.gather(*(_peer(maddrs) for _ in range(n_peers))))
    return observer, peers


async def _shutdown(*dhts: InLoopDHT) -> None:
    await asyncio.gather(*(d.shutdown() for d in dhts), return_exceptions=True)


@pytest.mark.integration
def test_view_counts_experts_replicas_nodes_and_losses():
    async def scenario() -> None:
        observer, (p0, p1, p2) = await _swarm(3)
        try:
            r0, r1, r2 = ExpertRegistry(p0), ExpertRegistry(p1), ExpertRegistry(p2)
            both = ["ffn.0.0", "ffn.0.1", "ffn.1.0"]
            assert await r0.announce(both, endpoint="10.0.0.1:1", node_id="a", load=0.5, ttl=30)
            assert await r1.announce([*both, "ffn.1.1"], endpoint="10.0.0.2:1", node_id="b", load=2.0, ttl=30)
            assert await r2.announce(["attn.3", "attn.5"], endpoint="10.0.0.3:1", node_id="c", load=0.0, ttl=30,
                                     node_info={"dht": ["/ip4/10.0.0.3/tcp/1"]})
            view = SwarmView(ExpertRegistry(observer), prefixes=parse_prefixes("ffn.[0:2].[0:4]"), period=0.5)
            snap = await view.refresh()

            assert set(snap.nodes) == {"a", "b", "c"}
            assert snap.nodes["b"].load == 2.0 and len(snap.nodes["b"].experts) == 4
            assert snap.nodes["c"].info == {"dht": ["/ip4/10.0.0.3/tcp/1"]}
            ffn, attn = snap.prefixes["ffn"], snap.prefixes["attn"]
            assert ffn.grid == ((0, 2), (0, 4)) and ffn.declared and ffn.cells == 8
            assert {uid: [e.endpoint for e in eps] for uid, eps in ffn.experts.items()} == {
                "ffn.0.0": ["10.0.0.1:1", "10.0.0.2:1"], "ffn.0.1": ["10.0.0.1:1", "10.0.0.2:1"],
                "ffn.1.0": ["10.0.0.1:1", "10.0.0.2:1"], "ffn.1.1": ["10.0.0.2:1"]}
            assert ffn.coverage == 4 / 8
            # attn was never declared: discovered from node c's record, grid = bounding box from 0
            assert set(attn.experts) == {"attn.3", "attn.5"} and attn.grid == ((0, 6),) and not attn.declared

            # graceful leave of b (tombstones): ffn.1.1 is gone, the rest lose a replica
            first_seen_a = snap.nodes["a"].first_seen
            assert await r1.withdraw([*both, "ffn.1.1"], node_id="b", ttl=30)
            assert await r0.announce(both, endpoint="10.0.0.1:1", node_id="a", load=0.7, ttl=30)
            snap = await view.refresh()
            assert set(snap.nodes) == {"a", "c"} and list(snap.gone_nodes) == ["b"]
            assert set(snap.prefixes["ffn"].experts) == set(both)
            assert all(len(eps) == 1 for eps in snap.prefixes["ffn"].experts.values())
            assert list(snap.gone_experts) == ["ffn.1.1"] and snap.gone_experts["ffn.1.1"].detail["prefix"] == "ffn"
            assert snap.nodes["a"].first_seen == first_seen_a and snap.nodes["a"].load == 0.7
            assert snap.nodes["a"].last_announce > first_seen_a  # its record's expiration moved forward

            # b comes back: no longer listed as gone (a longer ttl: its tombstones outlive a ttl=30 record)
            assert await r1.announce(["ffn.1.1"], endpoint="10.0.0.2:1", node_id="b", load=0.0, ttl=60)
            snap = await view.refresh()
            assert "b" in snap.nodes and not snap.gone_nodes and not snap.gone_experts
            assert view.counters.node_departures == 1 and view.counters.expert_disappearances == {"ffn": 1}

            status = json.loads(json.dumps(view.to_json()))
            assert [n["node_id"] for n in status["nodes"]] == ["a", "b", "c"]  # sorted by endpoint
            assert status["prefixes"]["ffn"]["alive"] == 4 and status["prefixes"]["ffn"]["replicas_min"] == 1

            families = {f.name: f for f in text_string_to_metric_families(
                generate_latest(make_registry(view, dht_peers=lambda: 3)).decode())}
            alive = {s.labels["prefix"]: s.value for s in families["dmoe_swarm_experts_alive"].samples}
            assert alive == {"ffn": 4, "attn": 2}
            assert [s.value for s in families["dmoe_swarm_node_departures"].samples] == [1]
        finally:
            await _shutdown(observer, p0, p1, p2)

    asyncio.run(scenario())


@pytest.mark.integration
def test_expired_records_vanish_without_a_withdraw():
    async def scenario() -> None:
        observer, (peer,) = await _swarm(1)
        try:
            ttl = 2.0
            assert await ExpertRegistry(peer).announce(["ffn.0", "ffn.1"], endpoint="h:1", node_id="x", load=0, ttl=ttl)
            view = SwarmView(ExpertRegistry(observer), period=0.2)
            assert set((await view.refresh()).prefixes["ffn"].experts) == {"ffn.0", "ffn.1"}
            deadline = time.monotonic() + ttl + 5
            while (await view.refresh()).nodes and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            snap = view.snapshot
            assert not snap.nodes and not snap.prefixes["ffn"].experts
            assert set(snap.gone_experts) == {"ffn.0", "ffn.1"} and set(snap.gone_nodes) == {"x"}
        finally:
            await _shutdown(observer, peer)

    asyncio.run(scenario())


@pytest.mark.integration
def test_walk_probes_grid_depth_when_nobody_told_it():
    async def scenario() -> None:
        observer, (peer,) = await _swarm(1)
        try:
            uids = ["moe.0.1.2", "moe.0.1.3", "moe.2.0.0"]
            assert await ExpertRegistry(peer).announce(uids, endpoint="h:1", node_id="x", load=0, ttl=30)
            view = SwarmView(ExpertRegistry(observer))
            probed = await view.registry.walk_grid("moe", None)
            known = await view.registry.walk_grid("moe", 3)
            assert set(probed) == set(known) == set(uids)
            assert await view.registry.walk_grid("nothing", None) == {}
        finally:
            await _shutdown(observer, peer)

    asyncio.run(scenario())


def test_parse_prefixes():
    assert parse_prefixes("ffn, layer0.ffn.[0:4].[2:8] ,") == [
        PrefixSpec("ffn"), PrefixSpec("layer0.ffn", ((0, 4), (2, 8)))]
    assert parse_prefixes("ffn.") == [PrefixSpec("ffn")]
    for bad in ("ffn.3", "ffn.[4:4]", ".[0:2]", "ffn.[0:2].x", "f f n"):
        with pytest.raises(ConfigError):
            parse_prefixes(bad)


def test_http_server_survives_slow_and_bad_clients():
    async def scenario() -> None:
        server = HttpServer({"/": lambda: Response(200, b"hello"), "/boom": lambda: 1 / 0}, read_timeout=1.0)
        host, port = server.bind("127.0.0.1", 0)
        await server.start()

        async def request(raw: bytes) -> bytes:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(raw)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return data

        try:
            slow_reader, slow_writer = await asyncio.open_connection(host, port)
            slow_writer.write(b"GET / HT")  # and never finishes its request line
            ok = await request(b"GET /?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"\r\n\r\nhello")
            head = await request(b"HEAD / HTTP/1.1\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 5" in head and head.endswith(b"\r\n\r\n")
            assert (await request(b"GET /boom HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 500")
            assert (await request(b"GET / HTTP/1.1\r\nX: " + b"a" * 40000 + b"\r\n\r\n")).startswith(b"HTTP/1.1 431")
            assert (await request(b"DELETE / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
            assert (await asyncio.wait_for(slow_reader.read(), 5)).startswith(b"HTTP/1.1 408")  # dropped in time
            slow_writer.close()
        finally:
            await server.close()

    asyncio.run(scenario())


def test_http_port_in_use_is_a_clear_error():
    first = HttpServer({})
    host, port = first.bind("127.0.0.1", 0)
    try:
        with pytest.raises(CoordinatorStartError, match=f"cannot bind HTTP port 127.0.0.1:{port}: address already"):
            HttpServer({}).bind(host, port)
    finally:
        asyncio.run(first.close())


def test_identity_is_created_once_and_reused(tmp_path):
    path = tmp_path / "sub" / "id.key"
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(str(load_or_create_identity(path)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1  # racing first starts agree on one key
    assert str(load_or_create_identity(path)) == results[0]
    assert [p.name for p in path.parent.iterdir()] == ["id.key"]  # no temp files left behind


def test_known_peers_file_round_trip_skips_garbage(tmp_path):
    own = load_or_create_identity(tmp_path / "own.key")
    other = load_or_create_identity(tmp_path / "other.key")
    path = tmp_path / "peers.json"
    good = f"/ip4/127.0.0.1/tcp/4000/p2p/{other}"
    write_known_peers(path, [good, f"/ip4/127.0.0.1/tcp/4001/p2p/{own}"])
    data = json.loads(path.read_text())
    path.write_text(json.dumps([*data, "garbage", 5]))
    assert read_known_peers(path, own_peer_id=own) == [good]  # own address and garbage dropped
    assert read_known_peers(tmp_path / "missing.json", own_peer_id=own) == []
    Path(tmp_path / "broken.json").write_text("{not json")
    assert read_known_peers(tmp_path / "broken.json", own_peer_id=own) == []


class _FakeRegistry:
    """``list_nodes`` and ``walk_grid`` answered from a dict node_id -> experts (no DHT, no processes)."""

    def __init__(self) -> None:
        self.serving: dict[str, list[str]] = {}

    async def list_nodes(self) -> list[NodeRecord]:
        return [NodeRecord(node, f"10.0.0.{i}:1", uids, 0.0, get_dht_time() + 30)
                for i, (node, uids) in enumerate(sorted(self.serving.items()))]

    async def walk_grid(self, prefix: str, dims: int | None) -> dict[str, list[ExpertEndpoint]]:
        out: dict[str, list[ExpertEndpoint]] = {}
        for node, uids in sorted(self.serving.items()):
            for uid in uids:
                if uid.startswith(prefix + "."):
                    out.setdefault(uid, []).append(ExpertEndpoint(uid, f"{node}:1", node, 0.0, get_dht_time() + 30))
        return out


def test_status_shows_replication_at_risk_and_unserved_experts():
    fake = _FakeRegistry()
    fake.serving = {"a": ["ffn.0.0", "ffn.0.1", "attn.0"], "b": ["ffn.0.0", "attn.1"], "c": ["ffn.0.0", "attn.1"]}
    view = SwarmView(fake, prefixes=parse_prefixes("ffn.[0:2].[0:2]"))  # type: ignore[arg-type]
    asyncio.run(view.refresh())
    status = json.loads(json.dumps(view.to_json()))
    ffn, attn = status["prefixes"]["ffn"], status["prefixes"]["attn"]
    assert ffn["replication"] == {"ffn.0.0": 3, "ffn.0.1": 1}
    assert ffn["at_risk"] == ["ffn.0.1"]
    assert ffn["unserved"] == ["ffn.1.0", "ffn.1.1"]  # declared grid: every cell nobody serves
    assert attn["replication"] == {"attn.0": 1, "attn.1": 2} and attn["at_risk"] == ["attn.0"]
    assert attn["unserved"] == []
    assert (status["experts_at_risk"], status["experts_unserved"]) == (2, 2)
    assert status["replication_histogram"] == {"0": 2, "1": 2, "2": 1, "3": 1}

    # a leaves for good: ffn.0.1 and attn.0 lose their only holder; an undeclared grid lists the uids it saw
    del fake.serving["a"]
    asyncio.run(view.refresh())
    status = json.loads(json.dumps(view.to_json()))
    ffn, attn = status["prefixes"]["ffn"], status["prefixes"]["attn"]
    assert ffn["unserved"] == ["ffn.0.1", "ffn.1.0", "ffn.1.1"] and ffn["at_risk"] == []
    assert attn["unserved"] == ["attn.0"] and attn["replication"] == {"attn.1": 2}
    assert (status["experts_at_risk"], status["experts_unserved"]) == (0, 4)
    assert status["replication_histogram"] == {"0": 4, "2": 2}


# the page's script run in node against a minimal DOM (elements with children, classes, attributes, text)
_DOM_SHIM = """
const vm = require("vm");
class Elem {
  constructor(tag) { this.tag = tag; this.children = []; this.attrs = {}; this.className = ""; this.dataset = {};
                     this.style = {}; this.own = ""; }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  set textContent(v) { this.children = []; this.own = String(v); }
  get textContent() { return this.own + this.children.map(c => typeof c === "string" ? c : c.textContent).join(""); }
  append(...xs) { this.children.push(...xs); }
  replaceChildren(...xs) { this.own = ""; this.children = xs; }
}
const byId = {};
const document = {createElement: tag => new Elem(tag), body: new Elem("body"),
                  getElementById: id => byId[id] || (byId[id] = new Elem("div"))};
const ctx = vm.createContext({document, setTimeout: () => 0, fetch: () => new Promise(() => {}), console});
vm.runInContext(process.argv[process.argv.length - 1], ctx);
ctx.render(JSON.parse(require("fs").readFileSync(0, "utf8")));
const flat = [];
const walk = (n, id) => {
  if (typeof n === "string") return;
  flat.push({id, tag: n.tag, class: n.className, attrs: n.attrs, text: n.textContent});
  n.children.forEach(c => walk(c));
};
for (const [id, n] of Object.entries(byId)) walk(n, id);
process.stdout.write(JSON.stringify(flat));
"""


def _render_page(status: dict[str, Any]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node (JavaScript) is not installed")
    script = PAGE_HTML.split("<script>", 1)[1].split("</script>", 1)[0]
    done = subprocess.run([node, "-e", _DOM_SHIM, "--", script], input=json.dumps(status).encode(),
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return json.loads(done.stdout)


@pytest.mark.integration  # runs the page script in node
def test_page_shows_replication_line_and_at_risk_experts():
    fake = _FakeRegistry()
    fake.serving = {"a": ["ffn.0.0", "ffn.0.1"], "b": ["ffn.0.0"]}
    view = SwarmView(fake, prefixes=parse_prefixes("ffn.[0:2].[0:2]"))  # type: ignore[arg-type]
    asyncio.run(view.refresh())
    elements = _render_page({"coordinator": {"peer_id": "Qm", "dht": []}, **json.loads(json.dumps(view.to_json()))})
    line = next(e for e in elements if e["class"] == "muted replication")
    assert line["attrs"]["data-prefix"] == "ffn"
    assert line["text"] == "replication: 1 with 1 holder, 1 with 2 holders, 2 unserved"
    risky = next(e for e in elements if e["class"] == "warn at-risk")
    assert risky["text"].startswith("1 at risk (one holder): ")
    assert [(e["attrs"]["data-uid"], e["attrs"]["title"]) for e in elements if e["class"] == "risky"] == [
        ("ffn.0.1", "a:1")]
    cards = " | ".join(e["text"] for e in elements if e["class"] == "card")
    assert "1experts at risk (1 holder)" in cards and "2experts unserved" in cards
