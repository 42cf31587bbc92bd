"""Normalization layers, chosen by one string through ``get_norm`` (detectron2's
``layers/batch_norm.py`` keeps its ``get_norm`` the same way).

The paper's point (Sec. 3.1, "Normalization") is that training from scratch needs normalization
that does not depend on a large per-GPU batch, in *every* layer: backbone, FPN, box and mask
heads.  ``model.build_model`` takes each of them from here at build time; nothing converts norm
layers after the model is built.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from . import distributed as dist

NORMS = ("GN", "SyncBN", "BN", "FrozenBN", "none")
NORM_TYPES = (nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)




class FP32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 under autocast (bf16/fp16 statistics over small groups lose
    precision); returns the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm with statistics over every process's batch, on any device.

    On CUDA this runs ``torch.nn.SyncBatchNorm``'s forward.  On the CPU (gloo), where torch's
    refuses to run (and DDP refuses modules holding it), the statistics come from differentiable
    all-reduces, so gradients flow to every rank's input as in BN over the concatenated batch:
    first the per-channel count and sum (the mean), then the sum of squared deviations from that
    mean (the variance; two passes, so a large mean does not cancel the variance away in fp32).
    A rank with an empty batch (no RoIs for the mask head, say) still takes part with zeros:
    every rank joins every collective, so none waits forever.  In one process, and in eval mode,
    it is plain BN.  Parameters and buffers are BatchNorm2d's, so BN state dicts load.
    """

    process_group = None  # all ranks (read by torch.nn.SyncBatchNorm.forward)
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels  # (ditto)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or dist.world_size() == 1:
            return super().forward(x)
        if x.device.type != "cpu":
            return self._torch_forward(x)
        c = x.shape[1]
        xf = x.float()
        dims = [d for d in range(x.dim()) if d != 1]
        count = torch.full((1,), x.numel() // max(c, 1), dtype=torch.float32, device=x.device)
        first = dist.differentiable_all_reduce(torch.cat([xf.sum(dims), count]))
        n = first[-1].detach()
        if n.item() == 0:
            # An empty batch on every rank: nothing to normalize.  The affine parameters stay in the
            # graph (with zero gradient) so DDP finds every parameter used, as on any other step.
            return x + 0 * (self.weight.sum() + self.bias.sum()) if self.affine else x
        mean = first[:c] / n
        shape = [1, c] + [1] * (x.dim() - 2)
        centered = xf - mean.view(shape)
        var = dist.differentiable_all_reduce((centered * centered).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
                self.num_batches_tracked.add_(1)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight.float()
        out = centered * scale.view(shape)
        if self.affine:
            out = out + self.bias.float().view(shape)
        return out.to(x.dtype)

    def _torch_forward(self, x: Tensor) -> Tensor:
        """torch.nn.SyncBatchNorm's forward (CUDA kernels, NCCL), with the CPU path's rule for empty batches."""
        if x.numel() > 0:
            return nn.SyncBatchNorm.forward(self, x)  # type: ignore[arg-type]
        buffers = [b for b in (self.running_mean, self.running_var, self.num_batches_tracked) if b is not None]
        kept = [b.clone() for b in buffers] if self.track_running_stats else []
        # torch builds an empty rank's statistics in the input's dtype, the others' come back fp32
        # from batch_norm_stats: under bf16/fp16 the all-gather would mismatch (a hang or garbage).
        out = nn.SyncBatchNorm.forward(self, x.float())  # type: ignore[arg-type]
        if kept and _ranks_with_data(out) == 0:
            # Empty on every rank: torch's batch_norm_gather_stats_with_counts updates the running
            # statistics all the same, from no counts (mean 0, variance 0 / (0 - 1)), so both would
            # shrink by 1 - momentum.  Nothing was seen: put them back, as the CPU path leaves them.
            with torch.no_grad():
                for b, k in zip(buffers, kept):
                    b.copy_(k)
        return out.to(x.dtype)


def _ranks_with_data(out: Tensor) -> int | None:
    """How many ranks had data in the torch SyncBN forward that made ``out`` (None where it cannot be read)."""
    # torch saves the gathered counts, empty ranks' filtered out, last for its backward.  Read them
    # from the autograd node, not a collective of our own: an empty rank cannot know whether
    # the others are empty without one, and an extra collective in every SyncBN layer costs all steps.
    saved = getattr(out.grad_fn, "saved_tensors", None)
    if not saved:
        return None
    counts = saved[-1]
    return len(counts) if counts.dtype == torch.int32 and counts.dim() == 2 else None


def get_norm(norm: str, channels: int, *, gn_groups: int = 32) -> nn.Module:
    """The one normalization switch (detectron2's ``get_norm``): a layer for ``channels``."""
    if norm == "GN":
        if channels % gn_groups:
            raise ValueError(f"GroupNorm: {channels} channels do not divide into model.gn_groups={gn_groups}")
        return FP32GroupNorm(gn_groups, channels)
    if norm == "SyncBN":
        return SyncBatchNorm(channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


def norm_factory(norm: str, *, gn_groups: int = 32) -> Callable[[int], nn.Module] | None:
    """``get_norm`` bound to a norm name, in the ``norm_layer(channels)`` form torchvision takes.

    ``None`` for "none" (torchvision then gives its convs a bias).  FrozenBN applies to the
    backbone only: FPN and heads are new layers without pretrained statistics to freeze, so
    they get no norm, as in Detectron's FrozenBN baselines.
    """
    if norm in ("none", "FrozenBN"):
        return None
    return partial(get_norm, norm, gn_groups=gn_groups)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every normalization layer of the model, by name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]
