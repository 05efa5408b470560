"""Expert state between replicas (``dmoe.node.state``) and the self-placement rules (``dmoe.dht.placement``):
pure functions on real torch modules and optimizers, no processes."""

from __future__ import annotations

import pytest
import torch
from dmoe.node.replicas import round_weights, too_far
from dmoe.node.state import (
    ExpertState,
    StateError,
    apply_merge,
    average,
    check_state,
    digest,
    max_state_bytes,
    relative_distance,
)

from dmoe.dht.placement import neediest, swap_candidate
from dmoe.experts import create_expert

H = 16


def expert(uid: str = "ffn.0.0", seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    module = create_expert("ffn", hidden_dim=H, seed=seed, uid=uid)
    return module, torch.optim.Adam(module.parameters(), lr=1e-2)


def train_steps(module: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, H, generator=gen)
        module(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def state_of(module: torch.nn.Module, optimizer: torch.optim.Optimizer, updates: int, weight: float = 1.0
             ) -> ExpertState:
    import copy

    return ExpertState({k: v.clone() for k, v in module.state_dict().items()}, copy.deepcopy(optimizer.state_dict()),
                       updates, weight)


def test_a_packed_state_passes_its_checks_and_loads_into_a_fresh_replica():
    module, opt = expert()
    train_steps(module, opt, 3, seed=1)
    payload = state_of(module, opt, 3).pack()
    fresh, fresh_opt = expert()
    state = check_state(payload, size=len(payload), sha256=digest(payload), module=fresh, optimizer=fresh_opt)
    assert state.updates == 3 and relative_distance(state.module, module.state_dict()) == 0.0
    fresh.load_state_dict(state.module)
    fresh_opt.load_state_dict(state.optimizer)  # the optimizer state is torch's own format
    assert len(payload) <= max_state_bytes(fresh)


@pytest.mark.parametrize("damage", ["digest", "size", "shape", "nan", "garbage", "other_class"])
def test_a_damaged_or_foreign_state_is_refused_with_a_reason(damage):
    module, opt = expert()
    train_steps(module, opt, 1, seed=1)
    state = state_of(module, opt, 1)
    if damage == "shape":
        state.module[next(iter(state.module))] = torch.zeros(2, 2)
    if damage == "nan":
        name = next(k for k, v in state.module.items() if v.is_floating_point())
        state.module[name] = state.module[name].clone().fill_(float("nan"))
    if damage == "other_class":
        other = create_expert("transformer", hidden_dim=H, seed=0, uid="ffn.0.0")
        state.module = other.state_dict()
    payload = b"not a torch file at all" if damage == "garbage" else state.pack()
    sha = digest(payload)
    size = len(payload) + (1 if damage == "size" else 0)
    if damage == "digest":
        sha = "0" * 64
    with pytest.raises(StateError) as e:
        check_state(payload, size=size, sha256=sha, module=module, optimizer=opt)
    assert str(e.value)  # a reason, not an empty error


def test_averaging_two_replicas_and_applying_it_keeps_the_steps_taken_since_the_snapshot():
    a, opt_a = expert()
    b, opt_b = expert()
    train_steps(a, opt_a, 4, seed=1)
    train_steps(b, opt_b, 2, seed=2)
    snap_a, snap_b = state_of(a, opt_a, 4, weight=4), state_of(b, opt_b, 2, weight=2)
    merged = average([snap_a, snap_b])
    for name, t in merged.module.items():
        if t.is_floating_point():
            expected = (4 * snap_a.module[name].double() + 2 * snap_b.module[name].double()) / 6
            assert torch.allclose(t.double(), expected, atol=1e-6)
    assert float(merged.optimizer["state"][0]["step"]) == 4  # step counts: the maximum

    # both idle since the snapshot: both end up exactly at the merged state
    apply_merge(a, opt_a, snap_a, merged)
    apply_merge(b, opt_b, snap_b, average([snap_b, snap_a]))
    assert relative_distance(a.state_dict(), b.state_dict()) < 1e-6

    # a replica that trained on after its snapshot keeps that progress on top of the merge
    c, opt_c = expert()
    train_steps(c, opt_c, 2, seed=3)
    snap_c = state_of(c, opt_c, 2)
    train_steps(c, opt_c, 1, seed=4)
    after = {k: v.clone() for k, v in c.state_dict().items()}
    merged_c = average([snap_c, snap_a])
    apply_merge(c, opt_c, snap_c, merged_c)
    for name, t in c.state_dict().items():
        if t.is_floating_point():
            assert torch.allclose(t, merged_c.module[name] + (after[name] - snap_c.module[name]), atol=1e-6)
    assert all(bool((s["exp_avg_sq"] >= 0).all()) for s in opt_c.state.values())


def test_a_replica_far_behind_the_best_lineage_does_not_pull_the_others_back():
    trained, opt = expert()
    train_steps(trained, opt, 5, seed=1)
    fresh, fresh_opt = expert()
    states = round_weights([state_of(trained, opt, 100, weight=5), state_of(fresh, fresh_opt, 3, weight=3)])
    assert [s.weight for s in states] == [5, 0.0]
    merged = average(states)
    assert relative_distance(merged.module, trained.state_dict()) < 1e-7


def test_neediest_puts_unserved_then_under_replicated_then_busy_experts_first():
    wanted = ["g.0", "g.1", "g.2", "g.3"]
    holders = {"g.0": 2, "g.1": 1, "g.2": 0, "g.3": 1}
    loads = {"g.1": 0.1, "g.3": 5.0}
    assert neediest(wanted, holders, loads, salt="node") == ["g.2", "g.3", "g.1", "g.0"]
    assert neediest(wanted, holders, loads, exclude=["g.2"], salt="node")[0] == "g.3"
    # ties are broken per node, so that nodes joining together spread over equally needy experts
    ties = [f"t.{i}" for i in range(16)]
    firsts = {neediest(ties, {}, {}, salt=f"node{j}")[0] for j in range(8)}
    assert len(firsts) > 1


def test_a_full_node_moves_one_expert_only_from_over_to_under_replicated():
    wanted = ["g.0", "g.1", "g.2"]
    assert swap_candidate(["g.0"], wanted, {"g.0": 3, "g.1": 2, "g.2": 1}, {}, replicas=2) == ("g.0", "g.2")
    # no move when giving up would drop an expert to R or below, or nothing is under-replicated
    assert swap_candidate(["g.0"], wanted, {"g.0": 2, "g.1": 2, "g.2": 1}, {}, replicas=2) is None
    assert swap_candidate(["g.0"], wanted, {"g.0": 3, "g.1": 2, "g.2": 2}, {}, replicas=2) is None
    # after the move neither side qualifies any more: no flapping back
    assert swap_candidate(["g.2"], wanted, {"g.0": 2, "g.1": 2, "g.2": 2}, {}, replicas=2) is None


def test_a_replica_cannot_outvote_us_by_its_claims_nor_drag_us_far_in_one_round():
    ours, opt = expert()
    train_steps(ours, opt, 2, seed=1)
    liar, liar_opt = expert(seed=7)  # other weights altogether
    own = state_of(ours, opt, 10, weight=2)
    claim = state_of(liar, liar_opt, 10, weight=1e9)
    assert round_weights([own, claim])[1].weight == 4.0 * (2 + 1)  # _WEIGHT_CAP x (ours + 1)
    assert too_far(own, claim) is not None  # a different lineage altogether: refused
    near = state_of(ours, opt, 10)
    assert too_far(own, near) is None


def test_a_merge_counts_every_replicas_progress_in_full_and_replicas_agree_after_it():
    from dmoe.node.backend import ExpertBackend

    from dmoe.config.node import OptimizerOptions
    from dmoe.experts import expert_schema

    def replica() -> ExpertBackend:
        module = create_expert("ffn", hidden_dim=H, seed=0, uid="ffn.0.0")
        return ExpertBackend("ffn.0.0", module, schema=expert_schema(module, H), expert_cls="ffn", hidden_dim=H,
                             optimizer=OptimizerOptions(lr=1e-2))

    a, b = replica(), replica()
    base = {k: v.clone() for k, v in a.module.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    for backend, steps in ((a, 3), (b, 1)):
        for _ in range(steps):
            x = torch.randn(4, H, generator=gen)
            backend.backward([x], [torch.randn(4, H, generator=gen)])
    snap_a, snap_b = a.snapshot(), b.snapshot()
    merged_a = average(round_weights([snap_a, snap_b]))
    merged_b = average(round_weights([snap_b, snap_a]))
    for name, t in merged_a.module.items():
        if t.is_floating_point():  # base + both deltas: nobody's steps are averaged away
            expected = base[name] + (snap_a.module[name] - base[name]) + (snap_b.module[name] - base[name])
            assert torch.allclose(t, expected, atol=1e-6)
    a.merge(snap_a, merged_a)
    b.merge(snap_b, merged_b)
    assert relative_distance(a.module.state_dict(), b.module.state_dict()) < 1e-6
    # the next round's deltas start from the merge: idle replicas have nothing more to add
    again_a, again_b = a.snapshot(), b.snapshot()
    assert all(float(d.abs().max()) < 1e-6 for d in again_a.delta.values())  # rounding only
    merged = average(round_weights([again_a, again_b]))
    assert relative_distance(merged.module, a.module.state_dict()) < 1e-6
