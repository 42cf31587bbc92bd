"""A recipe trial, not a feature: ``scratchdet`` with the mask head trained on at most CAP of each image's
sampled positive RoIs (a seeded random subset), to measure what the mask branch's share of a step buys.

Mask R-CNN trains its mask head on every positive RoI the box sampler drew (up to 16 an image in the
default job); in a late fp32 step on 2 cores that branch is about a fifth of the step (docs/performance.md).
This script swaps the model's RoI heads for a subclass that runs torchvision's box branch unchanged and
then the mask branch on the capped subset, and otherwise runs the CLI as given:

    MASK_CAP=8 python benchmarks/mask_cap_trial.py train train.amp=off --out DIR --no-progress

It is not shipped as an option: the trial (docs/performance.md) saved 7% of the fp32 job's time, short of
the 15-minute bound, and a recipe change must first be measured on real data.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss

from scratchdet import engine, layers
from scratchdet.cli import main


class CappedMaskRoIHeads(RoIHeads):
    """torchvision's RoI heads whose mask branch, in training, sees at most ``cap`` positives an image."""

    cap = 8

    def select_training_samples(self, proposals, targets):  # noqa: ANN001, ANN201 - torchvision's signature
        self._samples = super().select_training_samples(proposals, targets)
        return self._samples

    def forward(self, features, proposals, image_shapes, targets=None):  # noqa: ANN001, ANN201
        if not self.training or self.mask_roi_pool is None:
            return super().forward(features, proposals, image_shapes, targets)
        pool, self.mask_roi_pool = self.mask_roi_pool, None  # torchvision's forward without its mask branch
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            self.mask_roi_pool = pool
        boxes, matched, labels, _ = self._samples
        seeds = layers._SAMPLE_SEEDS.get()  # the image seeds the box sampler draws from (salt 3: another draw)
        mask_boxes: list[Tensor] = []
        mask_matched: list[Tensor] = []
        for k, (b, m, lab) in enumerate(zip(boxes, matched, labels)):
            pos = torch.where(lab > 0)[0]
            if len(pos) > self.cap:
                g = torch.Generator().manual_seed((int(seeds[k]) * 1_000_003 + 3) % 2**63) if seeds else None
                pos = pos[torch.randperm(len(pos), generator=g)[: self.cap]]
            mask_boxes.append(b[pos])
            mask_matched.append(m[pos])
        logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
        losses["loss_mask"] = maskrcnn_loss(logits, mask_boxes, [t["masks"] for t in targets],
                                            [t["labels"] for t in targets], mask_matched)
        return result, losses


def _build(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    model = _original_build(*args, **kwargs)
    if type(model.roi_heads) is RoIHeads:
        model.roi_heads.__class__ = CappedMaskRoIHeads
        print(f"[trial] mask head on at most {CappedMaskRoIHeads.cap} positives an image", file=sys.stderr)
    return model


if __name__ == "__main__":
    CappedMaskRoIHeads.cap = int(os.environ.get("MASK_CAP", "8"))
    _original_build = engine.build_model
    engine.build_model = _build
    sys.exit(main(sys.argv[1:]))
