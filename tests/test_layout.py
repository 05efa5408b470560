"""The tree shows the architecture: one folder per plane, imports that run one way, defaults defined once.

Read statically from the sources (every import, including those under ``TYPE_CHECKING`` or inside
functions), so a violation is caught before anything runs.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"dmoe": REPO / "dmoe", "dmoe.node": REPO / "node", "dmoe.coordinator": REPO / "coordinator"}

# plane -> planes it may import ("base": the shared modules at dmoe's top level and dmoe.config)
ALLOWED = {
    "base": {"base"},
    "wire": {"base", "wire"},
    "dht": {"base", "wire", "dht"},
    "client": {"base", "wire", "dht", "client"},
    "train": {"base", "wire", "dht", "client", "train"},
    "relay": {"base", "wire", "dht", "relay"},  # relays and the dial-back check (node and coordinator run them)
    "node": {"base", "wire", "dht", "relay", "node"},
    "coordinator": {"base", "wire", "dht", "relay", "coordinator"},
    "sim": {"base", "wire", "dht", "client", "train", "relay", "node", "coordinator", "sim"},
    "api": {"base", "client"},  # dmoe/__init__.py: the public client API
    "dispatcher": {"base", "dispatcher"},  # dmoe/cli.py: imports subcommands by name at run time only
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            if "expert_pb2" in path.name:
                continue
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def plane(module: str) -> str:
    parts = module.split(".")
    if module == "dmoe":
        return "api"
    if module in ("dmoe.cli", "dmoe.__main__"):
        return "dispatcher"
    if len(parts) > 1 and parts[1] in ("wire", "dht", "client", "train", "relay", "sim", "node", "coordinator"):
        return parts[1]
    return "base"  # dmoe.errors, dmoe.experts, dmoe.ready, dmoe.metrics_exporter, dmoe.config.*


def imports_of(module: str) -> set[str]:
    """dmoe modules ``module`` imports (resolved to modules that exist)."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dmoe"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("dmoe")]
        out.update(n for n in names if n in MODULES and n != module)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def test_imports_run_one_way_between_planes():
    bad = [f"{m} ({plane(m)}) imports {d} ({plane(d)})" for m, deps in GRAPH.items() for d in deps
           if plane(d) not in ALLOWED[plane(m)]]
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_node_or_coordinator():
    library = [m for m in MODULES if plane(m) not in ("node", "coordinator", "sim")]
    bad = [(m, d) for m in library for d in GRAPH[m] if plane(d) in ("node", "coordinator")]
    assert not bad


def test_no_import_cycles():
    # a package's __init__ importing its own submodules is not a cycle through the package
    edges = {m: {d for d in deps if not (m.startswith(d + ".") and (MODULES[d].name == "__init__.py"))}
             for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_every_command_line_default_comes_from_the_config_tree():
    """A flag whose dataclass field exists takes that field's default: nothing is restated by a CLI."""
    from dmoe.coordinator.cli import build_parser as coordinator_parser
    from dmoe.node.cli import build_parser as node_parser

    from dmoe.config import flags
    from dmoe.config.client import MoEOptions
    from dmoe.config.coordinator import CoordinatorOptions
    from dmoe.config.node import BatchingOptions, NodeConfig, OptimizerOptions
    from dmoe.config.sim import ChaosOptions, SimulationOptions
    from dmoe.config.train import CollabOptions, DataOptions, ModelConfig, TrainOptions, TrainSwarmOptions
    from dmoe.sim.chaos_cli import build_parser as chaos_parser
    from dmoe.sim.cli import build_parser as simulate_parser
    from dmoe.train.cli import build_parser as train_parser

    parsers = {
        "node": (node_parser(), [NodeConfig, BatchingOptions, OptimizerOptions]),
        "train": (train_parser(), [TrainSwarmOptions, ModelConfig, MoEOptions, TrainOptions, DataOptions,
                                   CollabOptions]),
        "coordinator": (coordinator_parser(), [CoordinatorOptions]),
        "simulate": (simulate_parser(), [SimulationOptions]),
        "chaos": (chaos_parser(), [ChaosOptions]),
    }
    for name, (parser, trees) in parsers.items():
        actions = {a.dest: a for a in parser._actions}
        for tree in trees:
            for f in dataclasses.fields(tree):
                if not f.metadata.get("cli"):
                    continue
                assert f.name in actions, f"dmoe {name} has no flag for {tree.__name__}.{f.name}"
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                    assert actions[f.name].default == flags.default_of(tree, f.name), (name, f.name)
                assert actions[f.name].help, f"{tree.__name__}.{f.name} has no docstring"
