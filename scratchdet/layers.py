"""The pieces of the detector that ``model`` and ``cascade`` share: init fills, the fp32 box predictor, seeded sampling.

They live apart from ``model`` so that ``cascade`` (which ``model.build_model`` calls) need not import ``model``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

# --------------------------------------------------------------------------- init


def msra_fill_(module: nn.Module) -> None:
    """He et al.'s MSRA init of every conv and transposed conv (fan_out, ReLU gain), biases 0; norms
    to identity (Caffe2's MSRAFill, detectron2's ``c2_msra_fill``)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def normal_fill_(module: nn.Module, std: float) -> None:
    """Gaussian init of the weights of every conv and fc layer, biases 0 (Detectron's predictors)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def xavier_fill_(module: nn.Module) -> None:
    """Caffe2's XavierFill (uniform in +-sqrt(3 / fan_in), biases 0) of every conv and fc layer: FPN
    convs and the box head's fc, as Detectron and detectron2 (``c2_xavier_fill``) do."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- fp32 predictors


def autocast_off(x: Tensor) -> torch.autocast:
    """A region where autocast is off for ``x``'s device (the caller passes fp32 inputs)."""
    return torch.autocast(x.device.type, enabled=False)


class FP32BoxPredictor(FastRCNNPredictor):
    """Class scores and box deltas computed in fp32 (two small fc layers)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with autocast_off(x):
            return super().forward(x.float())


# --------------------------------------------------------------------------- mask targets
#
# torchvision builds Mask R-CNN's mask targets (``roi_heads.project_masks_on_boxes``) with ``roi_align``
# on the full-size ground-truth masks, adaptive sampling.  Under deterministic algorithms on CUDA,
# ``torchvision.ops.roi_align`` sends every call, forward included, to its pure-PyTorch ``_roi_align``,
# whose intermediate is [K, 1, 28, 28, H, W]: at 800x1216 with 128 RoIs about 0.4 TiB, out of memory at
# the first step of any Mask R-CNN preset with train.deterministic=on.  It does so because the kernel's
# *backward* adds with atomics; its forward writes each output once.  Targets need no gradient, so they
# take the compiled kernel's forward on every device: the same op the CPU (and CUDA outside
# deterministic mode) ran before, so CPU runs are unchanged to the bit.


def mask_target_roi_align(input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int],
                          spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align`` for inputs that need no gradient (mask targets): the compiled
    kernel's forward, never the pure-PyTorch fallback deterministic mode picks on CUDA."""
    from torchvision.ops._utils import convert_boxes_to_roi_format
    from torchvision.ops.roi_align import roi_align

    if input.requires_grad or torch.jit.is_scripting():
        return roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    rois = boxes if isinstance(boxes, Tensor) else convert_boxes_to_roi_format(boxes)
    h, w = (output_size, output_size) if isinstance(output_size, int) else output_size
    with torch.no_grad():
        return torch.ops.torchvision.roi_align(input, rois, spatial_scale, h, w, sampling_ratio, aligned)


def use_mask_target_roi_align() -> None:
    """Make torchvision's mask-target builder (``roi_heads.project_masks_on_boxes``, used by its
    ``maskrcnn_loss``: the standard and the cascade heads) call ``mask_target_roi_align``.  The module's
    ``roi_align`` name serves that function alone; nothing else of torchvision changes."""
    from torchvision.models.detection import roi_heads

    roi_heads.roi_align = mask_target_roi_align


# --------------------------------------------------------------------------- seeded sampling
#
# torchvision samples the RPN's anchors and the box head's RoIs with torch.randperm on the global
# RNG, image after image: in one process with 2 images the second image's draw depends on the
# first's, while 2 processes with 1 image each draw both from the same state.  Drawing each
# image's sample from the image's own seed (the data sampler's per-sample seed) makes sampling a
# function of the data alone: the same in any number of processes, and independent of the global
# RNG stream.

_SAMPLE_SEEDS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("sample_seeds", default=None)


@contextlib.contextmanager
def sampling_seeds(seeds: list[int | None]) -> Iterator[None]:
    """Within this block, the detector draws image i's anchor and RoI samples from ``seeds[i]``."""
    token = _SAMPLE_SEEDS.set(list(seeds) if seeds and all(s is not None for s in seeds) else None)
    try:
        yield
    finally:
        _SAMPLE_SEEDS.reset(token)


class SeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's balanced positive/negative sampler, drawing from per-image seeds when given."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float, *, salt: int) -> None:
        super().__init__(batch_size_per_image, positive_fraction)
        self.salt = salt  # the RPN and the box head draw different samples from one image seed

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        seeds = _SAMPLE_SEEDS.get()
        if seeds is None or len(seeds) != len(matched_idxs):
            return super().__call__(matched_idxs)
        pos_masks, neg_masks = [], []
        for matched, seed in zip(matched_idxs, seeds):
            # The permutation is drawn where the anchors are: on a GPU a CPU randperm over every negative
            # anchor (about 2.5 ms an image at 800x1333) and its copy would cost a few percent of a step.
            # The CPU's stream is the one it always was, so CPU runs are unchanged to the bit.
            device = matched.device
            g = torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + self.salt) % 2**63)
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos = positive[torch.randperm(positive.numel(), generator=g, device=device)[:num_pos]]
            neg = negative[torch.randperm(negative.numel(), generator=g, device=device)[:num_neg]]
            pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
            pos_mask[pos] = 1
            neg_mask[neg] = 1
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks
