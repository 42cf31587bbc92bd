
"""The solver: warmup + multi-step LR schedule, per-parameter weight decay, scheduler state."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
from torch import nn

from scratchdet.config import SolverConfig, load_config
from scratchdet.model import build_model
from scratchdet.solver import build_lr_scheduler, build_optimizer, lr_factor, param_groups

from .conftest import TINY_MODEL

# Listed here rather than taken from scratchdet.norm.NORM_TYPES, so the test does not trust the code it checks.
NORMS = (nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm)
# Three different decays, so a parameter put in the wrong group shows up as a wrong value.
WD, WD_NORM, WD_BIAS = 1e-4, 3e-5, 2e-4


def small_net(norm: nn.Module | None = None) -> nn.Sequential:
    # Conv (weight + bias), norm, fc: one parameter of each kind; 3x3 input -> 1x1 output, so Linear(4, 2) fits.
    return nn.Sequential(nn.Conv2d(3, 4, 3), norm if norm is not None else nn.GroupNorm(2, 4), nn.Flatten(),
                         nn.Linear(4, 2))


def optimizer_and_scheduler(*, base_lr: float = 0.02, steps=(), gamma: float = 0.1, warmup_iters: int = 0,
                            warmup_factor: float = 0.001):
    optimizer = build_optimizer(small_net(), base_lr=base_lr, momentum=0.9, weight_decay=WD, weight_decay_norm=WD_NORM,
                                weight_decay_bias=WD_BIAS)
    scheduler = build_lr_scheduler(optimizer, steps=steps, gamma=gamma, warmup_iters=warmup_iters,
                                   warmup_factor=warmup_factor)
    return optimizer, scheduler


def run_lrs(optimizer: torch.optim.Optimizer, scheduler, n: int) -> list[float]:
    """The LR of each of ``n`` iterations, read as the training loop reads it: before ``scheduler.step()``."""
    lrs = []
    for _ in range(n):
        group_lrs = {g["lr"] for g in optimizer.param_groups}
        assert len(group_lrs) == 1, f"param groups disagree on the LR: {group_lrs}"  # the schedule applies to all
        lrs.append(group_lrs.pop())
        optimizer.step()  # no gradients: a no-op, but keeps the optimizer-before-scheduler order of training
        scheduler.step()
    return lrs


# --------------------------------------------------------------------------- warmup


@pytest.mark.parametrize(("warmup_iters", "warmup_factor"), [(1000, 0.001), (8, 0.25), (5, 0.0)])
def test_warmup_is_linear_from_warmup_factor_to_one(warmup_iters, warmup_factor):
    base_lr = 0.02
    optimizer, scheduler = optimizer_and_scheduler(base_lr=base_lr, warmup_iters=warmup_iters,
                                                   warmup_factor=warmup_factor)
    lrs = run_lrs(optimizer, scheduler, warmup_iters + 3)

    def expected(i: int) -> float:
        return base_lr * (warmup_factor + (1 - warmup_factor) * min(i, warmup_iters) / warmup_iters)

    assert lrs[0] == pytest.approx(base_lr * warmup_factor, rel=1e-12, abs=0)
    for i in (1, 2, warmup_iters // 2, warmup_iters - 1):
        assert lrs[i] == pytest.approx(expected(i), rel=1e-12, abs=1e-18), i
    assert lrs[warmup_iters - 1] < base_lr  # still warming up one iteration before the end
    # Reaches the base LR exactly at warmup_iters and stays there (no steps configured).
    assert lrs[warmup_iters:] == pytest.approx([base_lr] * 3, rel=1e-12, abs=0)
    # Linear: every warmup increment is the same.
    increments = [b - a for a, b in zip(lrs[:warmup_iters], lrs[1:warmup_iters + 1])]
    assert increments == pytest.approx([base_lr * (1 - warmup_factor) / warmup_iters] * warmup_iters, rel=1e-6)


def test_no_warmup_starts_at_the_base_lr():
    # warmup_iters=0 must not divide by zero, nor scale iteration 0.
    assert lr_factor(0, steps=(), gamma=0.1, warmup_iters=0, warmup_factor=0.001) == 1.0
    optimizer, scheduler = optimizer_and_scheduler(base_lr=0.02)
    assert run_lrs(optimizer, scheduler, 3) == [0.02] * 3


# --------------------------------------------------------------------------- steps


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_lr_drops_exactly_at_the_steps(gamma):
    base_lr, steps = 0.02, (5, 8)
    optimizer, scheduler = optimizer_and_scheduler(base_lr=base_lr, steps=steps, gamma=gamma)
    lrs = run_lrs(optimizer, scheduler, 12)
    expected = [base_lr] * 5 + [base_lr * gamma] * 3 + [base_lr * gamma**2] * 4
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    # Spelled out at the boundaries: not one iteration early, not one late.
    assert lrs[4] == pytest.approx(base_lr) and lrs[5] == pytest.approx(base_lr * gamma)
    assert lrs[7] == pytest.approx(base_lr * gamma) and lrs[8] == pytest.approx(base_lr * gamma**2)


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_step_inside_warmup_multiplies_the_warmup_factor(gamma):
    # Detectron multiplies the warmup ramp by the step factor: a drop inside the warmup applies at once.
    base_lr, warmup_iters, warmup_factor, step = 0.02, 10, 0.1, 4
    optimizer, scheduler = optimizer_and_scheduler(base_lr=base_lr, steps=(step,), gamma=gamma,
                                                   warmup_iters=warmup_iters, warmup_factor=warmup_factor)
    lrs = run_lrs(optimizer, scheduler, 13)
    ramp = [warmup_factor + (1 - warmup_factor) * min(i, warmup_iters) / warmup_iters for i in range(13)]
    expected = [base_lr * r * (gamma if i >= step else 1.0) for i, r in enumerate(ramp)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert lrs[warmup_iters] == pytest.approx(base_lr * gamma)  # warmup over: the dropped base LR


def test_lr_factor_matches_the_paper_schedule():
    # The 1x schedule at 16 images: drops at 60k and 80k, 1000 warmup iterations from 0.001.
    f = dict(steps=(60_000, 80_000), gamma=0.1, warmup_iters=1000, warmup_factor=0.001)
    assert lr_factor(0, **f) == pytest.approx(0.001)
    assert lr_factor(500, **f) == pytest.approx(0.5005)
    assert lr_factor(1000, **f) == 1.0
    assert lr_factor(59_999, **f) == 1.0
    assert lr_factor(60_000, **f) == pytest.approx(0.1)
    assert lr_factor(79_999, **f) == pytest.approx(0.1)
    assert lr_factor(80_000, **f) == pytest.approx(0.01)


# --------------------------------------------------------------------------- weight decay


def expected_decays(model: nn.Module, *, weight_decay: float, weight_decay_norm: float,
                    weight_decay_bias: float) -> dict[int, float]:
    """id(param) -> the decay it should get, for every trainable parameter (norm takes precedence over bias)."""
    out = {}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, NORMS):
                out[id(p)] = weight_decay_norm
            elif pname == "bias":
                out[id(p)] = weight_decay_bias
            else:
                out[id(p)] = weight_decay
    return out


def check_groups(model: nn.Module, groups: list[dict]) -> None:
    counts = Counter(id(p) for g in groups for p in g["params"])
    assert all(c == 1 for c in counts.values()), "a parameter is in more than one group"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(counts) == trainable, "groups must hold every trainable parameter and nothing else"
    got = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    want = expected_decays(model, weight_decay=WD, weight_decay_norm=WD_NORM, weight_decay_bias=WD_BIAS)
    names = {id(p): n for n, p in model.named_parameters()}
    wrong = {names[i]: (got[i], want[i]) for i in want if got[i] != want[i]}
    assert not wrong, f"(got, expected) weight decay: {wrong}"


@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 4), nn.BatchNorm2d(4), nn.SyncBatchNorm(4)],
                         ids=["GroupNorm", "BatchNorm2d", "SyncBatchNorm"])
def test_weight_decay_groups_of_a_small_net(norm):
    model = small_net(norm)
    groups = param_groups(model, weight_decay=WD, weight_decay_norm=WD_NORM, weight_decay_bias=WD_BIAS)
    check_groups(model, groups)
    decay = {g["name"]: g["weight_decay"] for g in groups}
    assert decay == {"weight": WD, "norm": WD_NORM, "bias": WD_BIAS}
    # Norm scale and shift both decay as norm, not the shift as a bias.
    norm_group = next(g for g in groups if g["name"] == "norm")
    assert {id(p) for p in norm_group["params"]} == {id(norm.weight), id(norm.bias)}


@pytest.mark.parametrize("norm", ["GN", "BN", "SyncBN"])
def test_weight_decay_groups_of_the_built_model(norm):
    model = build_model(load_config(None, [*TINY_MODEL, f"model.norm={norm}"]).model, num_classes=3)
    assert any(isinstance(m, NORMS) for m in model.modules())  # otherwise the test would check nothing
    check_groups(model, param_groups(model, weight_decay=WD, weight_decay_norm=WD_NORM, weight_decay_bias=WD_BIAS))


def test_frozen_parameters_are_in_no_group():
    # freeze_at given to build_model directly: the config refuses it with random init (frozen layers never learn).
    model = build_model(replace(load_config(None, TINY_MODEL).model, freeze_at=2), num_classes=3)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen, "freeze_at=2 should freeze the stem and res2"
    groups = param_groups(model, weight_decay=WD, weight_decay_norm=WD_NORM, weight_decay_bias=WD_BIAS)
    assert not frozen & {id(p) for g in groups for p in g["params"]}
    check_groups(model, groups)


def test_norm_decay_is_zero_by_default():
    # Detectron's WEIGHT_DECAY_GN / detectron2's WEIGHT_DECAY_NORM: norm scales and shifts are not decayed.
    assert SolverConfig().weight_decay_norm == 0.0
    solver = load_config(None).solver
    model = small_net()
    optimizer = build_optimizer(model, base_lr=solver.base_lr, momentum=solver.momentum,
                                weight_decay=solver.weight_decay, weight_decay_norm=solver.weight_decay_norm,
                                weight_decay_bias=solver.weight_decay_bias)
    got = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert got[id(model[1].weight)] == 0.0 and got[id(model[1].bias)] == 0.0
    assert got[id(model[0].weight)] == solver.weight_decay > 0


def test_optimizer_applies_the_decay():
    # With a zero gradient, one SGD step (momentum buffer starts at the first d_p) moves w by lr * wd * w.
    torch.manual_seed(0)
    model = small_net()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))  # norm weights away from 1 and biases away from 0, so decay would show
    lr, wd, wd_bias = 0.1, 1e-2, 5e-3
    optimizer = build_optimizer(model, base_lr=lr, momentum=0.9, weight_decay=wd, weight_decay_norm=0.0,
                                weight_decay_bias=wd_bias)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    after = dict(model.named_parameters())
    for name in ("0.weight", "3.weight"):  # conv and fc weights
        torch.testing.assert_close(after[name].detach(), before[name] * (1 - lr * wd))
    for name in ("0.bias", "3.bias"):
        torch.testing.assert_close(after[name].detach(), before[name] * (1 - lr * wd_bias))
    for name in ("1.weight", "1.bias"):  # GroupNorm: untouched
        assert torch.equal(after[name].detach(), before[name]), name


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("k", [0, 3, 7, 11])
def test_scheduler_state_round_trip(k):
    # Exact resume: optimizer and scheduler rebuilt from scratch, then loaded from the state after k iterations,
    # must give the LRs the uninterrupted run gives (k=3: inside warmup, 7: across a step, 11: after both).
    kwargs = dict(base_lr=0.02, steps=(6, 9), gamma=0.1, warmup_iters=5, warmup_factor=0.001)
    n = 14
    optimizer, scheduler = optimizer_and_scheduler(**kwargs)
    reference = run_lrs(optimizer, scheduler, n)

    optimizer, scheduler = optimizer_and_scheduler(**kwargs)
    first = run_lrs(optimizer, scheduler, k)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    optimizer, scheduler = optimizer_and_scheduler(**kwargs)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    assert scheduler.last_epoch == k  # the scheduler's state is the iteration
    assert first + run_lrs(optimizer, scheduler, n - k) == reference


# --------------------------------------------------------------------------- gradient clipping


def test_norm_clipping_scales_a_huge_gradient_to_the_bound():
    from scratchdet.solver import build_gradient_clipper

    grads = [torch.full((3, 4), 1e6), torch.tensor([-2e6, 5e5])]
    direction = [g / torch.linalg.vector_norm(torch.cat([h.flatten() for h in grads])) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    build_gradient_clipper("norm", value=5.0)(grads, total)
    clipped = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    assert clipped.item() == pytest.approx(5.0, rel=1e-5)
    assert all(torch.allclose(g / clipped, d) for g, d in zip(grads, direction))  # the direction is kept
    small = [torch.tensor([0.1, -0.2])]
    build_gradient_clipper("norm", value=5.0)(small, None)  # under the bound: unchanged
    assert torch.equal(small[0], torch.tensor([0.1, -0.2]))
    inf_norm = [torch.tensor([3.0, -8.0]), torch.tensor([1.0])]
    build_gradient_clipper("norm", value=2.0, norm_type=float("inf"))(inf_norm, None)
    assert max(g.abs().max().item() for g in inf_norm) == pytest.approx(2.0, rel=1e-5)


def test_value_clipping_clamps_each_element_and_off_is_none():
    from scratchdet.solver import build_gradient_clipper

    grads = [torch.tensor([5.0, -7.0, 0.5])]
    build_gradient_clipper("value", value=1.0)(grads, None)
    assert torch.equal(grads[0], torch.tensor([1.0, -1.0, 0.5]))
    assert build_gradient_clipper("off", value=1.0) is None
    with pytest.raises(Exception, match="solver.clip_value"):
        load_config(None, ["solver.clip_gradients=norm", "solver.clip_value=0"])
    with pytest.raises(Exception, match="solver.clip_gradients"):
        load_config(None, ["solver.clip_gradients=sometimes"])
