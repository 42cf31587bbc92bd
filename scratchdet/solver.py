"""SGD with per-parameter weight decay, and the warmup + multi-step LR schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .norm import NORM_TYPES


def param_groups(model: nn.Module, *, weight_decay: float, weight_decay_norm: float,
                 weight_decay_bias: float) -> list[dict]:
    """Parameters grouped by the weight decay they get: weights, norm scales/shifts, biases."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    groups: dict[str, list] = {"weight": [], "norm": [], "bias": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "norm" if id(p) in norm_params else "bias" if name.endswith(".bias") else "weight"
        groups[kind].append(p)
    decay = {"weight": weight_decay, "norm": weight_decay_norm, "bias": weight_decay_bias}
    return [{"params": ps, "weight_decay": decay[k], "name": k} for k, ps in groups.items() if ps]


def build_optimizer(model: nn.Module, *, base_lr: float, momentum: float, weight_decay: float,
                    weight_decay_norm: float, weight_decay_bias: float) -> torch.optim.SGD:
    """Fused SGD (one kernel for all parameters), which also takes a device-side ``found_inf``
    flag: a step with a non-finite loss or gradient is skipped without the host reading the flag."""
    groups = param_groups(model, weight_decay=weight_decay, weight_decay_norm=weight_decay_norm,
                          weight_decay_bias=weight_decay_bias)
    optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=momentum, fused=True)
    if momentum:
        # Momentum buffers start at zero rather than at the first gradient (the same update: 0.9 * 0 + g):
        # a first step skipped through found_inf would otherwise leave them uninitialized memory.
        for group in groups:
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


GradientClipper = Callable[[list[torch.Tensor], "torch.Tensor | None"], None]


def build_gradient_clipper(mode: str, *, value: float, norm_type: float = 2.0) -> GradientClipper | None:
    """Gradient clipping as a function of the gradients (in place), or None for ``off``.

    ``norm`` scales every gradient by ``min(1, value / total_norm)``, the norm of all gradients together
    (torch's ``clip_grad_norm_``, as mmdetection's ``grad_clip``).  detectron2's ``SOLVER.CLIP_GRADIENTS``
    with ``CLIP_TYPE: norm`` clips each parameter tensor by its own norm instead, which bounds every layer
    alike however many there are; the total norm keeping the update's direction is our choice.  ``value``
    clamps each element, as detectron2's ``value``.  The clipper takes the total 2-norm the non-finite
    check already computed (no second pass, no host sync); a non-finite norm makes the gradients
    non-finite, and the step is skipped by that check anyway.
    """
    if mode == "off":
        return None
    if mode == "value":
        def clip_value(grads: list[torch.Tensor], total_norm: torch.Tensor | None) -> None:
            torch._foreach_clamp_min_(grads, -value)
            torch._foreach_clamp_max_(grads, value)
        return clip_value
    if mode != "norm":
        raise ValueError(f"gradient clipping {mode!r} is not off, norm or value")

    def clip_norm(grads: list[torch.Tensor], total_norm: torch.Tensor | None) -> None:
        if not grads:
            return
        if total_norm is None or norm_type != 2.0:
            total_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, norm_type)), norm_type)
        torch._foreach_mul_(grads, (value / (total_norm.float() + 1e-6)).clamp(max=1.0))
    return clip_norm


def describe_clipping(mode: str, *, value: float, norm_type: float = 2.0) -> str | None:
    """What ``build_gradient_clipper`` does, for the run's log; None for ``off``."""
    if mode == "off":
        return None
    what = (f"total {norm_type:g}-norm of the gradients at most {value:g}" if mode == "norm" else
            f"each gradient element within +-{value:g}")
    return f"gradient clipping: {what} (solver.clip_gradients, solver.clip_value)"


def skip_nonfinite_step(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """Take the SGD step unless ``bad`` (a device bool) is true; the flag stays on the device."""
    optimizer.found_inf = bad.float().reshape(1)  # read by fused SGD (as GradScaler sets it)
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def lr_factor(iteration: int, *, steps: Sequence[int], gamma: float, warmup_iters: int, warmup_factor: float) -> float:
    """Multiplier of the base LR at ``iteration``: linear warmup from ``warmup_factor``, then steps."""
    factor = gamma ** sum(iteration >= s for s in steps)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, steps: Sequence[int], gamma: float, warmup_iters: int,
                       warmup_factor: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration; its state (``last_epoch``) is the iteration."""
    steps = tuple(steps)

    def factor(it: int) -> float:
        return lr_factor(it, steps=steps, gamma=gamma, warmup_iters=warmup_iters, warmup_factor=warmup_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
