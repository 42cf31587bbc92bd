"""Mask R-CNN with a ResNet/ResNeXt-FPN backbone, built from torchvision's detection parts.

Every normalization layer (backbone, FPN, box head, mask head) comes from one ``get_norm``,
chosen by one string: the paper's point is that normalization must be right in *every* layer
for training from scratch (Sec. 3.1, "Normalization").  Nothing converts norm layers after
the model is built.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import Conv2dNormActivation
from torchvision.ops.poolers import _setup_scales

from . import distributed as dist
from .layers import (
    FP32BoxPredictor,
    SeededSampler,
    _fp32,
    msra_fill_,
    normal_fill_,
    use_mask_target_roi_align,
    xavier_fill_,
)
from .layers import sampling_seeds as sampling_seeds  # re-exported: engine and tests take it from here

NORMS = ("GN", "SyncBN", "BN", "FrozenBN", "none")
NORM_TYPES = (nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)


# --------------------------------------------------------------------------- norm


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


# --------------------------------------------------------------------------- backbone


def conv(cin: int, cout: int, k: int, *, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Attribute names match torchvision's, so its weights load."""

    expansion = 1

    def __init__(self, *, cin: int, planes: int, stride: int, groups: int, width_per_group: int, norm: Callable,
                 stride_in_1x1: bool = False) -> None:
        super().__init__()
        bias = isinstance(norm(planes), nn.Identity)
        self.conv1 = conv(cin, planes, 3, stride=stride, bias=bias)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, bias=bias)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 block; the stride on the 3x3 (torchvision's "ResNet v1.5") or, with
    ``stride_in_1x1``, on the 1x1 (Detectron's MSRA/Caffe2 ImageNet models)."""

    expansion = 4

    def __init__(self, *, cin: int, planes: int, stride: int, groups: int, width_per_group: int, norm: Callable,
                 stride_in_1x1: bool = False) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        bias = isinstance(norm(planes), nn.Identity)
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv(cin, width, 1, stride=s1, bias=bias)
        self.bn1 = norm(width)
        self.conv2 = conv(width, width, 3, stride=s3, groups=groups, bias=bias)
        self.bn2 = norm(width)
        self.conv3 = conv(width, planes * 4, 1, bias=bias)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes * 4, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(cin: int, cout: int, stride: int, norm: Callable) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    bias = isinstance(norm(cout), nn.Identity)
    return nn.Sequential(conv(cin, cout, 1, stride=stride, bias=bias), norm(cout))


def block_kind(depth: int) -> type:
    return STAGES[depth][0]


STAGES = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3)),
          101: (Bottleneck, (3, 4, 23, 3)), 152: (Bottleneck, (3, 8, 36, 3))}


class ResNet(nn.Module):
    """ResNet/ResNeXt trunk returning res2..res5 (strides 4..32); names follow torchvision's."""

    def __init__(
        self,
        *,
        depth: int = 50,
        groups: int = 1,
        width_per_group: int = 64,
        stem_channels: int = 64,
        base_width: int = 64,
        norm: str = "GN",
        gn_groups: int = 32,
        zero_init_residual: bool = False,
        stride_in_1x1: bool = False,
        freeze_at: int = 0,
    ) -> None:
        super().__init__()
        if depth not in STAGES:
            raise ValueError(f"ResNet depth {depth} is not one of {sorted(STAGES)}")
        if block_kind(depth) is BasicBlock and (groups != 1 or width_per_group != 64):
            raise ValueError(f"groups={groups}, width_per_group={width_per_group}: depth {depth} has basic blocks, "
                             "which have no grouped conv (ResNeXt needs depth 50, 101 or 152)")
        block, counts = STAGES[depth]

        def stage_norm(stage: int) -> Callable[[int], nn.Module]:
            # A frozen stage (stem = 1, res2 = 2, ...) keeps frozen statistics too: BN in train mode
            # would go on updating running statistics of layers whose weights do not learn
            # (detectron2 makes frozen stages FrozenBatchNorm2d for the same reason).
            frozen = stage <= freeze_at and norm in ("BN", "SyncBN")
            return partial(get_norm, "FrozenBN" if frozen else norm, gn_groups=gn_groups)

        self.conv1 = conv(3, stem_channels, 7, stride=2, bias=norm == "none")
        self.bn1 = stage_norm(1)(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = stem_channels
        self.out_channels: list[int] = []
        for i, n in enumerate(counts):
            planes = base_width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (j == 0 and i > 0) else 1
                blocks.append(block(cin=cin, planes=planes, stride=stride, groups=groups,
                                    width_per_group=width_per_group, norm=stage_norm(i + 2),
                                    stride_in_1x1=stride_in_1x1))
                cin = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(cin)
        msra_fill_(self)
        if zero_init_residual:
            # Goyal et al. 2017, Sec. 5.1: each residual branch starts as zero, each block as identity.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and hasattr(m.last_norm(), "weight"):
                    nn.init.zeros_(m.last_norm().weight)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Freeze the weights of the stem (1) and res2..res``freeze_at`` (Detectron's FREEZE_AT) for
        fine-tuning; their BN-family norms are already FrozenBatchNorm2d (built so in ``__init__``)."""
        stages = [[self.conv1, self.bn1]] + [[getattr(self, f"layer{i}")] for i in range(1, 5)]
        for stage in stages[:freeze_at]:
            for m in stage:
                for p in m.parameters():
                    p.requires_grad_(False)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """x: [B, 3, H, W] -> {"layer1".."layer4": [B, C_i, H/2^(i+1), W/2^(i+1)]}."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            out[name] = x
        return out


# --------------------------------------------------------------------------- fp32 boxes under autocast
#
# Under torch.autocast, torchvision's heads return bf16/fp16 outputs and its box decoding runs in
# the dtype of the deltas (BoxCoder casts the reference boxes to it), as does AnchorGenerator
# (anchors take the feature maps' dtype).  bf16 keeps 8 bits of mantissa: above 512 px every
# anchor, proposal and final box coordinate is a multiple of 4.  As detectron2 does, the
# predictors' outputs and everything decoded from them stay fp32 whatever the autocast dtype;
# only the heavy convolutions run in low precision.  Subclasses (not wrappers) keep
# torchvision's parameter names, so state dicts load unchanged.


class FP32AnchorGenerator(AnchorGenerator):
    """Anchors in fp32 whatever the features' dtype (only their sizes are read)."""

    def forward(self, image_list: Any, feature_maps: list[Tensor]) -> list[Tensor]:
        shapes = [torch.empty((0, *f.shape[-2:]), dtype=torch.float32, device=f.device) for f in feature_maps]
        return super().forward(image_list, shapes)


class FP32RPNHead(RPNHead):
    """RPN head whose 3x3 conv runs under autocast and whose objectness and delta predictors run in fp32."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in x:
            t = self.conv(feature)
            with _fp32(t):
                t = t.float()
                logits.append(self.cls_logits(t))
                deltas.append(self.bbox_pred(t))
        return logits, deltas


class FP32KeypointPredictor(KeypointRCNNPredictor):
    """Keypoint heatmap logits (transposed conv, then 2x bilinear upsampling) in fp32."""

    def forward(self, x: Tensor) -> Tensor:
        with _fp32(x):
            # Contiguous: torchvision's keypointrcnn_loss views the logits as [N * K, H * W], which a channels-last
            # tensor (train.channels_last) cannot give.
            return super().forward(x.float()).contiguous()


class FP32MaskPredictor(MaskRCNNPredictor):
    """Transposed conv under autocast, mask logits in fp32 (so mask probabilities are fp32)."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv5_mask(x))
        with _fp32(x):
            return self.mask_fcn_logits(x.float())


# --------------------------------------------------------------------------- both cores on a CPU
#
# Two of the training step's costliest parts on a CPU are single-threaded kernels: torchvision's
# RoIAlign (forward and backward, about 30% of the default job's step) and the RPN's per-image
# NMS (about 10%).  While they run, the other cores idle.  On the CPU scratchdet computes
# RoIAlign with a fixed sampling ratio as gathers of feature rows (``_GatherRoIAlign``: the same
# arithmetic as torchvision's kernel, bit for bit, in multi-threaded vectorized torch ops) and
# splits the rest over a small thread pool (each kernel releases the GIL): RoIAlign with an
# adaptive sampling ratio by chunks of RoIs, NMS by image.  Results are the same (the forward
# and NMS bit for bit; the chunked RoIAlign's input gradient sums the chunks' partial gradients,
# a fixed order, so runs stay deterministic).  CUDA takes the stock path.

_POOL: ThreadPoolExecutor | None = None


def _cpu_pool() -> ThreadPoolExecutor | None:
    """A pool of intra-step workers on multi-core CPUs (None with one thread)."""
    global _POOL
    n = min(torch.get_num_threads(), 4)
    if n < 2:
        return None
    if _POOL is None or _POOL._max_workers != n:
        _POOL = ThreadPoolExecutor(n, thread_name_prefix="scratchdet-op")
    return _POOL


class _ChunkedRoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign (aligned=False) over chunks of RoIs in parallel threads, in fp32."""

    @staticmethod
    def forward(ctx: Any, features: Tensor, rois: Tensor, scale: float, size: tuple[int, int], ratio: int,
                chunks: int) -> Tensor:
        pool = _cpu_pool()
        parts = list(torch.tensor_split(rois, chunks))
        ctx.save_for_backward(rois)
        ctx.meta = (scale, size, ratio, chunks, tuple(features.shape), features.dtype)
        run = partial(torch.ops.torchvision.roi_align, features, spatial_scale=scale, pooled_height=size[0],
                      pooled_width=size[1], sampling_ratio=ratio, aligned=False)
        outs = list(pool.map(lambda r: run(rois=r), parts)) if pool and chunks > 1 else [run(rois=rois)]
        return torch.cat(outs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        scale, size, ratio, chunks, (b, c, h, w), dtype = ctx.meta
        grad = grad.float().contiguous()
        run = partial(torch.ops.torchvision._roi_align_backward, spatial_scale=scale, pooled_height=size[0],
                      pooled_width=size[1], batch_size=b, channels=c, height=h, width=w, sampling_ratio=ratio,
                      aligned=False)
        pool = _cpu_pool()
        pairs = list(zip(torch.tensor_split(grad, chunks), torch.tensor_split(rois, chunks)))
        if pool and chunks > 1:
            parts = list(pool.map(lambda gr: run(gr[0], gr[1]), pairs))
            total = parts[0]
            for part in parts[1:]:
                total = total + part
        else:
            total = run(grad, rois)
        return total.to(dtype), None, None, None, None, None


def _sample_axis(start: Tensor, length: Tensor, bins: int, ratio: int, limit: int) -> tuple[Tensor, ...]:
    """One axis of torchvision's RoIAlign sampling (aligned=False) for R RoIs: the lower and upper
    neighbour, the weights of each, and whether the point counts, [R, bins * ratio] each.

    The fp32 operations and their order are torchvision's CPU kernel's (``roi_align_kernel.cpp``,
    ``bilinear_interpolate``), so every coordinate and weight is its value to the bit: points more
    than one cell outside the map count for nothing, points within one cell clamp to the border.
    """
    bin_size = length / bins
    step = torch.arange(bins, dtype=start.dtype, device=start.device).repeat_interleave(ratio)
    offset = (torch.arange(ratio, dtype=start.dtype, device=start.device) + 0.5).repeat(bins)
    y = start[:, None] + step * bin_size[:, None] + offset * bin_size[:, None] / ratio
    inside = (y >= -1.0) & (y <= limit)
    y = y.clamp(min=0)
    low = y.long()  # y >= 0 here: truncation is the kernel's (int) cast
    top = low >= limit - 1
    low = torch.where(top, limit - 1, low)
    y = torch.where(top, low.to(y.dtype), y)
    high = torch.where(top, low, low + 1)
    frac = y - low
    return low, high, frac, 1.0 - frac, inside


def _roi_corners(rois: Tensor, scale: float, size: tuple[int, int], ratio: int, h: int,
                 w: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Row indices into a level's [N * H * W, C] rows and bilinear weights, [R, oh, ow, ratio**2, 4]
    each (bin, then sample in torchvision's y-x order, then the four corners in its order), and the
    mask of the entries that count, of the same shape (None when all do)."""
    (oh, ow), r = size, len(rois)
    x1, y1, x2, y2 = (rois[:, k] * scale for k in range(1, 5))
    y_low, y_high, ly, hy, y_in = _sample_axis(y1, torch.clamp(y2 - y1, min=1.0), oh, ratio, h)
    x_low, x_high, lx, hx, x_in = _sample_axis(x1, torch.clamp(x2 - x1, min=1.0), ow, ratio, w)
    base = rois[:, 0].long()[:, None] * h
    y_low, y_high = (base + y_low) * w, (base + y_high) * w

    def outer(a: Tensor, b: Tensor, op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        return op(a.view(r, oh, 1, ratio, 1), b.view(r, 1, ow, 1, ratio))

    add, mul = torch.add, torch.mul
    idx = torch.stack([outer(y_low, x_low, add), outer(y_low, x_high, add), outer(y_high, x_low, add),
                       outer(y_high, x_high, add)], -1).view(r, oh, ow, ratio * ratio, 4)
    wt = torch.stack([outer(hy, hx, mul), outer(hy, lx, mul), outer(ly, hx, mul), outer(ly, lx, mul)],
                     -1).view(r, oh, ow, ratio * ratio, 4)
    inside = outer(y_in, x_in, torch.logical_and)
    if bool(inside.all()):
        return idx, wt, None
    # The kernel's empty sample: index 0 with weight 0 in the forward, no gradient at all.
    inside = inside.view(r, oh, ow, ratio * ratio, 1).expand(-1, -1, -1, -1, 4)
    return torch.where(inside, idx, 0), torch.where(inside, wt, 0.0), inside


def _fp32_rows(feature: Tensor) -> Tensor:
    """A feature map [N, C, H, W] as fp32 rows [N * H * W, C]: a view for a channels-last fp32 map,
    else one copy."""
    n, c, h, w = feature.shape
    x = feature.permute(0, 2, 3, 1)
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)
    return x.view(n * h * w, c)


_GATHER_CHUNK_BYTES = 8 << 20  # gathered fp32 corner rows per chunk: a few RoIs' worth stays in cache


class _GatherRoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign (aligned=False, a fixed sampling ratio) of RoIs over FPN levels, as
    gathers of feature rows, fp32 inside and bit for bit its values and input gradients.

    torchvision's CPU kernel is scalar and single-threaded: for each RoI, channel and bin it sums
    the four weighted corners of each sample point, then divides by the number of samples.  Here
    each level's feature map is read as rows of C channels (channels-last: a view), the four
    corners of every sample are gathered at once (``index_select``, each row a vector of
    channels), weighted and summed in the kernel's order; the backward scatters the weighted
    output gradient to the same rows (``index_add_``, in the kernel's order of RoIs, bins and
    samples).  RoIs go in chunks of about ``_GATHER_CHUNK_BYTES`` of gathered rows (the whole
    gather of 1200 inference RoIs is 60 MB; in chunks it ran 1.8x faster).  The result is
    ``[K, C, oh, ow]`` in the features' dtype and memory format.
    """

    @staticmethod
    def forward(ctx: Any, rois: Tensor, levels: Tensor | None, scales: tuple[float, ...], size: tuple[int, int],
                ratio: int, *features: Tensor) -> Tensor:
        c = features[0].shape[1]
        out = features[0].new_empty((len(rois), *size, c))
        chunk = max(1, _GATHER_CHUNK_BYTES // (size[0] * size[1] * ratio * ratio * 4 * c * 4))
        plan: list[tuple[Any, ...] | None] = []
        for level, (feature, scale) in enumerate(zip(features, scales)):
            idx = None if levels is None else torch.where(levels == level)[0]
            if idx is not None and len(idx) == 0:
                plan.append(None)
                continue
            corners, weights, inside = _roi_corners(rois if idx is None else rois[idx], scale, size, ratio,
                                                    *feature.shape[-2:])
            rows = _fp32_rows(feature)
            for start in range(0, len(corners), chunk):
                part = slice(start, start + chunk)
                picked = rows.index_select(0, corners[part].reshape(-1)).mul_(weights[part].reshape(-1, 1))
                picked = picked.view(-1, ratio * ratio, 4, c)
                # Each sample: ((w1 v1 + w2 v2) + w3 v3) + w4 v4; then the samples of a bin in order, / count.
                value = picked[:, :, 0].add(picked[:, :, 1]).add_(picked[:, :, 2]).add_(picked[:, :, 3])
                pooled = value[:, 0]
                for j in range(1, ratio * ratio):
                    pooled = pooled + value[:, j] if j == 1 else pooled.add_(value[:, j])
                if ratio > 1:
                    pooled = pooled / float(ratio * ratio)
                pooled = pooled.view(-1, *size, c)
                if idx is None:
                    out[part].copy_(pooled)
                else:
                    out.index_copy_(0, idx[part], pooled.to(out.dtype))
            plan.append((idx, corners, weights, inside, feature.shape, feature.dtype,
                         feature.is_contiguous(memory_format=torch.channels_last)))
        ctx.plan, ctx.size, ctx.ratio, ctx.chunk = plan, size, ratio, chunk
        out = out.permute(0, 3, 1, 2)
        return out if features[0].is_contiguous(memory_format=torch.channels_last) else out.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        size, ratio, chunk = ctx.size, ctx.ratio, ctx.chunk
        rows_grad = grad.permute(0, 2, 3, 1)
        grads: list[Tensor | None] = []
        for item in ctx.plan:
            if item is None:  # no RoI on this level: no gradient (autograd reads None as zeros)
                grads.append(None)
                continue
            idx, corners, weights, inside, (n, c, h, w), dtype, channels_last = item
            total = rows_grad.new_zeros((n * h * w, c), dtype=torch.float32)
            for start in range(0, len(corners), chunk):  # chunks in RoI order: the kernel's order of additions
                part = slice(start, start + chunk)
                g = (rows_grad[part] if idx is None else rows_grad.index_select(0, idx[part])).to(torch.float32)
                # The kernel's g_k = grad * w_k / count, added corner by corner, sample by sample, bin by bin.
                contrib = g.reshape(-1, *size, 1, 1, c) * weights[part, ..., None]
                if ratio > 1:
                    contrib = contrib / float(ratio * ratio)
                contrib, flat = contrib.view(-1, c), corners[part].reshape(-1)
                if inside is not None:
                    keep = inside[part].reshape(-1)
                    contrib, flat = contrib[keep], flat[keep]
                total.index_add_(0, flat, contrib)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            grads.append(total.view(n, h, w, c).permute(0, 3, 1, 2).to(dtype, memory_format=fmt))
        ctx.plan = None
        return (None, None, None, None, None, *grads)


class ParallelRoIPool(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (levels by Detectron's FPN rule, RoIAlign with
    aligned=False), whose CPU RoIAlign runs as gathers of feature rows (a fixed sampling ratio) or
    over chunks of RoIs in parallel threads (the adaptive ratio, ``sampling_ratio <= 0``)."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        pool = _cpu_pool()
        feats = [x[name] for name in self.featmap_names]
        gather = self.sampling_ratio > 0
        if feats[0].device.type != "cpu" or (pool is None and not gather):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        if gather:
            with torch.autocast("cpu", enabled=False):  # fp32 inside, as torchvision's autocast wrapper runs it
                return _GatherRoIAlign.apply(rois.float(), self.map_levels(boxes) if len(feats) > 1 else None,
                                             tuple(self.scales), tuple(self.output_size), self.sampling_ratio, *feats)
        levels = self.map_levels(boxes) if len(feats) > 1 else torch.zeros(len(rois), dtype=torch.int64)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        workers = pool._max_workers
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            if len(idx) == 0:
                continue
            with torch.autocast("cpu", enabled=False):  # RoIAlign in fp32, as torchvision's autocast wrapper does
                pooled = _ChunkedRoIAlign.apply(feat.float(), rois[idx].float(), scale, tuple(self.output_size),
                                                self.sampling_ratio, min(workers, len(idx)))
            out[idx] = pooled.to(out.dtype)
        return out


class ParallelRPN(RegionProposalNetwork):
    """torchvision's RPN whose per-image proposal filtering (clip, small-box removal, NMS per
    level, top-k) runs for the images of a batch in parallel threads on the CPU."""

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        pool = _cpu_pool()
        if pool is None or proposals.device.type != "cpu" or proposals.shape[0] < 2:
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        n = proposals.shape[0]
        objectness = objectness.detach().reshape(n, -1)
        levels = torch.cat([torch.full((k,), i, dtype=torch.int64) for i, k in enumerate(num_anchors_per_level)])
        top = self._get_top_n_idx(objectness, num_anchors_per_level)  # per level, before NMS
        rows = torch.arange(n)[:, None]
        scores = torch.sigmoid(objectness[rows, top])
        levels = levels[None].expand(n, -1)[rows, top]
        proposals = proposals[rows, top]
        post_n = self.post_nms_top_n()

        def one_image(i: int) -> tuple[Tensor, Tensor]:
            boxes = box_ops.clip_boxes_to_image(proposals[i], image_shapes[i])
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            keep = keep[scores[i][keep] >= self.score_thresh]
            keep = keep[box_ops.batched_nms(boxes[keep], scores[i][keep], levels[i][keep], self.nms_thresh)][:post_n]
            return boxes[keep], scores[i][keep]

        results = list(pool.map(one_image, range(n)))
        return [b for b, _ in results], [s for _, s in results]


# --------------------------------------------------------------------------- detector


class BatchOnlyTransform(GeneralizedRCNNTransform):
    """Normalize and pad to a batch; no resize and no mask pasting.

    Resizing happens in the data pipeline (``torchvision.transforms.v2``, in the loader's
    workers), so the model's own resize would only interpolate again.  Pasting 28x28 masks into
    full images is left to ``paste_detections``, which pastes at the *original* image size
    one image at a time rather than at the network's input size for the whole batch.
    """

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, Any]:
        return image, target

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: Any, original_image_sizes: Any) -> Any:
        return result


def build_model(
    *,
    num_classes: int,
    depth: int = 50,
    groups: int = 1,
    width_per_group: int = 64,
    stem_channels: int = 64,
    base_width: int = 64,
    norm: str = "GN",
    gn_groups: int = 32,
    zero_init_residual: bool = False,
    stride_in_1x1: bool = False,
    freeze_at: int = 0,
    fpn_channels: int = 256,
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
    anchor_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    rpn_batch_size_per_image: int = 256,
    rpn_pre_nms_topk_train: int = 2000,
    rpn_post_nms_topk_train: int = 2000,
    rpn_pre_nms_topk_test: int = 1000,
    rpn_post_nms_topk_test: int = 1000,
    box_head_num_conv: int = 4,
    box_head_conv_dim: int = 256,
    box_head_fc_dim: int = 1024,
    mask_head_num_conv: int = 4,
    mask_head_conv_dim: int = 256,
    roi_batch_size_per_image: int = 512,
    roi_positive_fraction: float = 0.25,
    score_thresh_test: float = 0.05,
    nms_thresh_test: float = 0.5,
    detections_per_image: int = 100,
    roi_sampling_ratio: int = 2,
    pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53),
    pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375),
    task: str = "masks",
    num_keypoints: int = 0,
    keypoint_head_num_conv: int = 8,
    keypoint_head_conv_dim: int = 512,
    roi_head: str = "standard",
    cascade_ious: tuple[float, ...] = (0.5, 0.6, 0.7),
    cascade_weights: tuple[float, ...] = (1.0, 0.5, 0.25),
) -> FasterRCNN:
    """Mask R-CNN (``task`` masks), Faster R-CNN (boxes) or Keypoint R-CNN (keypoints): FPN P2-P6,
    4conv1fc box head (or a cascade of them), 4-conv mask head, 8-conv keypoint head, every one
    normalized by ``norm``; ``num_classes`` excludes background.

    Input: list of float images [3, H, W] in 0-255 RGB.  Training returns the loss dict; inference
    returns per image ``boxes`` [N, 4] (xyxy, input pixels), ``labels`` [N], ``scores`` [N], and
    ``masks`` [N, 1, 28, 28] probabilities (paste them with ``paste_detections``) or ``keypoints``
    [N, K, 3] (x, y, visibility) with ``keypoints_scores`` [N, K].
    """
    if task not in ("masks", "boxes", "keypoints"):
        raise ValueError(f"task {task!r} is not masks, boxes or keypoints")
    if task == "keypoints" and num_keypoints < 1:
        raise ValueError("task keypoints: num_keypoints unknown (the training set's categories give it)")
    trunk = ResNet(depth=depth, groups=groups, width_per_group=width_per_group, stem_channels=stem_channels,
                   base_width=base_width, norm=norm, gn_groups=gn_groups, zero_init_residual=zero_init_residual,
                   stride_in_1x1=stride_in_1x1, freeze_at=freeze_at)
    head_norm = norm_factory(norm, gn_groups=gn_groups)
    backbone = BackboneWithFPN(
        trunk,
        return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
        in_channels_list=trunk.out_channels,
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),  # P6 = max-pool of P5, for the RPN only (as Detectron)
        norm_layer=head_norm,
    )
    xavier_fill_(backbone.fpn)
    anchors = FP32AnchorGenerator(tuple((s,) for s in anchor_sizes),
                                  (tuple(anchor_aspect_ratios),) * len(anchor_sizes))
    rpn_head = FP32RPNHead(fpn_channels, anchors.num_anchors_per_location()[0])
    normal_fill_(rpn_head, std=0.01)
    box_head = FastRCNNConvFCHead((fpn_channels, 7, 7), [box_head_conv_dim] * box_head_num_conv, [box_head_fc_dim],
                                  norm_layer=head_norm)
    msra_fill_(box_head)  # the 4 convs
    for fc in (m for m in box_head if isinstance(m, nn.Linear)):
        xavier_fill_(fc)  # detectron2's FastRCNNConvFCHead: c2_xavier_fill for its fc layers
    box_predictor = FP32BoxPredictor(box_head_fc_dim, num_classes + 1)
    normal_fill_(box_predictor.cls_score, std=0.01)
    normal_fill_(box_predictor.bbox_pred, std=0.001)
    pools = ["0", "1", "2", "3"]

    def roi_pool(size: int) -> ParallelRoIPool:
        return ParallelRoIPool(featmap_names=pools, output_size=size, sampling_ratio=roi_sampling_ratio)

    common = dict(
        num_classes=None, image_mean=list(pixel_mean), image_std=list(pixel_std), rpn_anchor_generator=anchors,
        rpn_head=rpn_head, rpn_pre_nms_top_n_train=rpn_pre_nms_topk_train, rpn_pre_nms_top_n_test=rpn_pre_nms_topk_test,
        rpn_post_nms_top_n_train=rpn_post_nms_topk_train, rpn_post_nms_top_n_test=rpn_post_nms_topk_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image, box_head=box_head, box_predictor=box_predictor,
        box_score_thresh=score_thresh_test, box_nms_thresh=nms_thresh_test, box_detections_per_img=detections_per_image,
        box_batch_size_per_image=roi_batch_size_per_image, box_positive_fraction=roi_positive_fraction,
        box_roi_pool=roi_pool(7))
    if task == "masks":
        mask_head = MaskRCNNHeads(fpn_channels, [mask_head_conv_dim] * mask_head_num_conv, 1, norm_layer=head_norm)
        msra_fill_(mask_head)
        mask_predictor = FP32MaskPredictor(mask_head_conv_dim, mask_head_conv_dim, num_classes + 1)
        msra_fill_(mask_predictor.conv5_mask)  # a transposed conv: MSRA fill, bias 0, as detectron2
        normal_fill_(mask_predictor.mask_fcn_logits, std=0.001)
        model: FasterRCNN = MaskRCNN(backbone, mask_head=mask_head, mask_predictor=mask_predictor,
                                     mask_roi_pool=roi_pool(14),
                                     **common)
    elif task == "keypoints":
        # Mask R-CNN's keypoint head: 8 3x3 convs of 512 channels, normalized like every other layer (our
        # choice: the paper names its keypoint model only as "R50-FPN and GN", not where the GN sits).
        keypoint_head = nn.Sequential(*[
            Conv2dNormActivation(fpn_channels if i == 0 else keypoint_head_conv_dim, keypoint_head_conv_dim, 3,
                                 norm_layer=head_norm) for i in range(keypoint_head_num_conv)])
        msra_fill_(keypoint_head)
        keypoint_predictor = FP32KeypointPredictor(keypoint_head_conv_dim, num_keypoints)
        msra_fill_(keypoint_predictor.kps_score_lowres)
        model = KeypointRCNN(backbone, keypoint_head=keypoint_head, keypoint_predictor=keypoint_predictor,
                             keypoint_roi_pool=roi_pool(14),
                             **common)
    else:
        model = FasterRCNN(backbone, **common)
    # torchvision's defaults for everything but the CPU threading (the detector builds its RPN itself).
    model.rpn = ParallelRPN(anchors, rpn_head, 0.7, 0.3, rpn_batch_size_per_image, 0.5,
                            {"training": rpn_pre_nms_topk_train, "testing": rpn_pre_nms_topk_test},
                            {"training": rpn_post_nms_topk_train, "testing": rpn_post_nms_topk_test}, 0.7)
    model.transform = BatchOnlyTransform(1, 1, list(pixel_mean), list(pixel_std), size_divisible=32)
    model.rpn.fg_bg_sampler = SeededSampler(rpn_batch_size_per_image, 0.5, salt=1)
    model.roi_heads.fg_bg_sampler = SeededSampler(roi_batch_size_per_image, roi_positive_fraction, salt=2)
    if task == "masks":
        use_mask_target_roi_align()  # deterministic mode on CUDA would build targets in 0.4 TiB (layers.py)
    if roi_head == "cascade":
        from .cascade import make_cascade

        make_cascade(model, ious=tuple(cascade_ious), weights=tuple(cascade_weights), fpn_channels=fpn_channels,
                     conv_dims=[box_head_conv_dim] * box_head_num_conv, fc_dim=box_head_fc_dim, norm_layer=head_norm,
                     num_classes=num_classes)
    return model


def model_kwargs(model_cfg: Any, num_classes: int | None = None, num_keypoints: int | None = None) -> dict[str, Any]:
    """The one translation from ``ModelConfig`` to ``build_model`` arguments.

    ``num_classes`` (and ``num_keypoints``) are the training set's; ``model.num_classes`` (and
    ``model.num_keypoints``) when not 0 must agree with them.
    """
    kwargs = {k: v for k, v in vars(model_cfg).items() if k not in ("init", "num_classes")}
    for k in ("anchor_sizes", "anchor_aspect_ratios", "pixel_mean", "pixel_std", "cascade_ious", "cascade_weights"):
        kwargs[k] = tuple(kwargs[k])
    if model_cfg.task == "keypoints":
        if model_cfg.num_keypoints and num_keypoints and model_cfg.num_keypoints != num_keypoints:
            raise ValueError(f"model.num_keypoints={model_cfg.num_keypoints} but the training set's categories have "
                             f"{num_keypoints} keypoints")
        kwargs["num_keypoints"] = num_keypoints or model_cfg.num_keypoints
    if model_cfg.num_classes and num_classes and model_cfg.num_classes != num_classes:
        raise ValueError(f"model.num_classes={model_cfg.num_classes} but the training set has {num_classes} categories")
    n = num_classes or model_cfg.num_classes
    if not n:
        raise ValueError("model.num_classes: unknown without a training set; set it (80 for COCO)")
    return {"num_classes": n, **kwargs}


TRUNK_KEYS = ("depth", "groups", "width_per_group", "stem_channels", "base_width", "norm", "gn_groups",
              "zero_init_residual", "stride_in_1x1")


def trunk_kwargs(model_cfg: Any) -> dict[str, Any]:
    """The ``ResNet`` arguments of a ``ModelConfig`` (for ``scratchdet pretrain``'s classifier)."""
    return {k: getattr(model_cfg, k) for k in TRUNK_KEYS}


def paste_detections(
    output: dict[str, Tensor], input_hw: tuple[int, int], orig_hw: tuple[int, int], mask_threshold: float = 0.5
) -> dict[str, Tensor]:
    """Map one image's detections from network-input to original pixels.

    Returns ``boxes`` [N, 4] xyxy (and ``keypoints`` [N, K, 3], scaled alike) and ``masks`` [N, H0, W0] bool at the
    original resolution: bit for bit
    ``paste_masks_in_image(masks, boxes, (H0, W0), padding=1)[:, 0] >= mask_threshold``, at a fraction of
    its cost.  torchvision builds a float image per detection, stacks them and thresholds the stack: N
    full images written, copied and read for N boxes that each cover a small part of the image.  Here
    each mask is resized exactly as torchvision resizes it (the same padded input, integer box and
    ``interpolate`` call, so the same values on any device), then thresholded and written only inside
    its box, into one preallocated tensor.

    ``masks`` is laid out column-major per mask (a transposed view of [N, W0, H0] storage), the Fortran
    (H, W, N) order COCO's RLE encoder reads, so ``to_coco_results`` encodes it without a copy.  A box
    wholly outside the image pastes nothing (torchvision's slicing fails on one).
    """
    (h, w), (h0, w0) = input_hw, orig_hw
    scale = torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h], dtype=output["boxes"].dtype, device=output["boxes"].device)
    boxes = output["boxes"] * scale
    result = {"boxes": boxes, "labels": output["labels"], "scores": output["scores"]}
    if "keypoints" in output:
        # Keypoints [N, K, 3] (x, y, visibility) scale as the boxes do (continuous coordinates).
        result["keypoints"] = torch.cat([output["keypoints"][..., :2] * scale[:2], output["keypoints"][..., 2:]], dim=-1)
        if "keypoints_scores" in output:
            result["keypoints_scores"] = output["keypoints_scores"]
    if "masks" not in output:
        return result
    if torch.jit.is_tracing():
        # A traced graph cannot hold the Python-int slicing below; torchvision's paste has a tracing path.
        result["masks"] = paste_masks_in_image(output["masks"], boxes, (h0, w0), padding=1)[:, 0] >= mask_threshold
        return result
    import numpy as np
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    n, device = len(boxes), output["masks"].device
    # Outside its box a pasted mask is 0.0, which passes a threshold <= 0, as in torchvision's result.
    outside = bool(0.0 >= mask_threshold)
    if device.type == "cpu":
        # numpy's zeros come from calloc, pages the OS hands out already zeroed and that are written only
        # where a box lands; torch.zeros would first write all N * H0 * W0 bytes.
        pasted = torch.from_numpy((np.ones if outside else np.zeros)((n, w0, h0), dtype=bool))
    else:
        pasted = torch.full((n, w0, h0), outside, dtype=torch.bool, device=device)
    if n:
        padded, box_scale = expand_masks(output["masks"], padding=1)
        int_boxes = expand_boxes(boxes, box_scale).to(dtype=torch.int64).tolist()  # one host sync for all boxes
        for i, (bx0, by0, bx1, by1) in enumerate(int_boxes):
            x0, x1, y0, y1 = max(bx0, 0), min(bx1 + 1, w0), max(by0, 0), min(by1 + 1, h0)
            if x1 <= x0 or y1 <= y0:
                continue
            size = (max(by1 - by0 + 1, 1), max(bx1 - bx0 + 1, 1))
            # expand() as torchvision calls it: the same input geometry picks the same interpolation kernel.
            resized = nn.functional.interpolate(padded[i, 0].expand((1, 1, -1, -1)), size=size, mode="bilinear",
                                                align_corners=False)[0, 0]
            pasted[i, x0:x1, y0:y1] = (resized[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0] >= mask_threshold).T
    result["masks"] = pasted.transpose(1, 2)
    return result


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every normalization layer of the model, by name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]
