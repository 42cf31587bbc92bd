"""``scratchdet pretrain``: ImageNet-style classification pre-training of the detector's backbone.

How a user without Detectron's GN models, or with their own image corpus, builds the
pretrained arm of the comparison: the same ResNet trunk (same ``model.*`` options, same norm),
a global-average-pool + fc classifier, SGD with cosine or step LR, random-resized crop and flip.
It writes ``backbone_final.pth``, which ``model.init=PATH`` reads, carrying the images and
pixels it saw so the fine-tuning run can report totals.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import Config, dump_yaml, to_dict
from .engine import MetricsWriter, environment, pick_device, prepare_run_dir, seed_everything, setup_logging
from .model import ResNet, trunk_kwargs
from .solver import lr_factor

log = logging.getLogger("scratchdet")


class Classifier(nn.Module):
    """A ResNet trunk with global average pooling and a linear classifier."""

    def __init__(self, trunk: ResNet, num_classes: int, pixel_mean: list[float], pixel_std: list[float]) -> None:
        super().__init__()
        self.trunk = trunk
        self.fc = nn.Linear(trunk.out_channels[-1], num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.register_buffer("mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] in 0-255 -> logits [B, num_classes]."""
        features = self.trunk((x - self.mean) / self.std)["layer4"]
        return self.fc(features.mean((2, 3)))


def _infinite(loader: DataLoader):
    while True:
        yield from loader


def pretrain(cfg: Config, run_dir: str | Path, *, force: bool = False, progress: bool = True) -> Path:
    """Train the classifier; returns the path of ``backbone_final.pth``."""
    run_dir = Path(run_dir)
    if not cfg.pretrain.images:
        raise ValueError("pretrain.images: give an ImageFolder root (one sub-folder of images per class)")
    prepare_run_dir(run_dir, resume=False, force=force)
    setup_logging(run_dir)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    device = pick_device(cfg.train.device)
    transform = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(cfg.pretrain.crop_size, antialias=True),
                            v2.RandomHorizontalFlip()])
    data = datasets.ImageFolder(cfg.pretrain.images, transform=transform)
    log.info("pretrain data: %s (%d images, %d classes)", cfg.pretrain.images, len(data), len(data.classes))
    m = cfg.model
    trunk = ResNet(**trunk_kwargs(m))
    model = Classifier(trunk, len(data.classes), m.pixel_mean, m.pixel_std).to(device)
    s = cfg.solver
    optimizer = torch.optim.SGD(model.parameters(), lr=s.base_lr, momentum=s.momentum, weight_decay=s.weight_decay)

    def factor(it: int) -> float:
        if cfg.pretrain.lr_schedule == "cosine":  # the warmup of lr_factor, then a cosine instead of steps
            warm = lr_factor(it, steps=(), gamma=1.0, warmup_iters=s.warmup_iters, warmup_factor=s.warmup_factor)
            return warm * 0.5 * (1 + math.cos(math.pi * it / s.max_iter))
        return lr_factor(it, steps=s.steps, gamma=s.gamma, warmup_iters=s.warmup_iters, warmup_factor=s.warmup_factor)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    loader = DataLoader(data, batch_size=s.ims_per_batch, shuffle=True, drop_last=len(data) >= s.ims_per_batch,
                        num_workers=cfg.dataloader.num_workers, generator=torch.Generator().manual_seed(cfg.train.seed))
    dump_yaml(cfg, run_dir / "config.yaml")
    (run_dir / "env.json").write_text(json.dumps(environment(), indent=1))
    metrics = MetricsWriter(run_dir)
    seen = {"images_seen": 0, "pixels_seen": 0}
    batches = _infinite(loader)
    bar = tqdm(total=s.max_iter, desc="pretrain", disable=not progress)
    t0 = time.perf_counter()
    model.train()
    for iteration in range(s.max_iter):
        images, labels = next(batches)
        images, labels = images.to(device).float(), labels.to(device)
        loss = nn.functional.cross_entropy(model(images), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at pretrain iteration {iteration}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        seen["images_seen"] += len(images)
        seen["pixels_seen"] += len(images) * images.shape[-1] * images.shape[-2]
        bar.update(1)
        if (iteration + 1) % cfg.train.log_period == 0 or iteration + 1 == s.max_iter:
            metrics.write({"iteration": iteration + 1, "loss": round(float(loss.detach()), 5),
                           "lr": optimizer.param_groups[0]["lr"], **seen,
                           "images_per_sec": round(seen["images_seen"] / (time.perf_counter() - t0), 3)})
    bar.close()
    metrics.close()
    meta: dict[str, Any] = {"format": "scratchdet-pretrain", "depth": m.depth, "norm": m.norm,
                            "classes": list(data.classes), "seen": seen, "config": to_dict(cfg)}
    out = run_dir / "backbone_final.pth"
    ckpt.save_checkpoint(out, {"backbone": trunk.state_dict(), "meta": meta})
    log.info("pretrained backbone written to %s (%d images seen); fine-tune with model.init=%s",
             out, seen["images_seen"], out)
    return out
