"""``scratchdet pretrain``: ImageNet-style classification pre-training of the detector's backbone.

How a user without Detectron's GN models, or with their own image corpus, builds the
pretrained arm of the comparison: the same ResNet trunk (same ``model.*`` options, same norm),
a global-average-pool + fc classifier, SGD with cosine or step LR, random-resized crop and flip.
It writes ``backbone_final.pth``, which ``model.init=PATH`` reads, carrying the images and
pixels it saw so the fine-tuning run can report totals.

A pretrain run directory is a training run's: periodic checkpoints, ``--resume``, SIGTERM,
``model_final.pth`` marking it finished.  Resume is exact because the image stream is a pure
function of the seed and the position in it (``PretrainSampler``), as ``data.TrainSampler`` is
for detection, and each image's crop and flip are drawn from its own seed.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import Config, ConfigError, to_dict
from .data import DataError, worker_init  # worker_init: one thread per worker; SIGTERM/SIGINT left to the main process
from .device import precision_name, precision_reason, use_channels_last
from .loop import StopSignal, Throughput, check_nonfinite, log_line, optimize, start_run
from .model import ResNet, count_parameters, trunk_kwargs
from .run import LossWindow, Preempted, RunRecord, restore_training_state
from .schedule import Schedule, resolve_schedule
from .solver import GradientClipper, build_gradient_clipper, build_optimizer, describe_clipping, lr_factor

log = logging.getLogger("scratchdet")

LR_SCHEDULES = ("cosine", "step")
BACKBONE_FINAL = "backbone_final.pth"


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


class PretrainSampler:
    """Infinite, resumable stream of batches of ``(index, sample_seed)`` over an image folder.

    The stream is epoch after epoch, each a permutation drawn from ``(seed, epoch)``; position
    ``p`` holds image ``perm[p // n][p % n]`` with the seed ``(seed, p)``, and batch ``i`` is
    positions ``i * batch_size`` onward.  Batch ``i`` is a pure function of ``(seed, i)``: resuming
    at iteration ``i`` is ``PretrainSampler(..., start=i)``.  Batches are always full (one may span
    two epochs), so an epoch is exactly ``n`` images, as ``solver.epochs`` counts them.
    """

    def __init__(self, num_images: int, *, batch_size: int, seed: int, start: int = 0) -> None:
        if num_images < 1:
            raise ValueError("PretrainSampler: no images")
        self.n, self.batch_size, self.seed, self.start = num_images, batch_size, seed, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position, epoch, order = self.start * self.batch_size, -1, np.empty(0, np.int64)
        while True:
            batch = []
            for p in range(position, position + self.batch_size):
                e, k = divmod(p, self.n)
                if e != epoch:
                    epoch, order = e, np.random.default_rng([self.seed, e]).permutation(self.n)
                batch.append((int(order[k]), int(np.random.SeedSequence([self.seed, p]).generate_state(1)[0])))
            yield batch
            position += self.batch_size


class SeededImageFolder(Dataset):
    """An ImageFolder whose item ``(index, seed)`` is the image cropped and flipped with its own RNG:
    the same key gives the same tensor in any worker, before or after a resume."""

    def __init__(self, root: str, *, crop_size: int, flip_prob: float, crop_scale: float = 0.08) -> None:
        self.folder = datasets.ImageFolder(root)
        self.classes: list[str] = list(self.folder.classes)
        self.transform = v2.Compose([v2.PILToTensor(),
                                     v2.RandomResizedCrop(crop_size, scale=(crop_scale, 1.0), antialias=True),
                                     v2.RandomHorizontalFlip(flip_prob)])

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = key
        image, label = self.folder[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label


def check_options(cfg: Config) -> None:
    """Refuse, before anything is written, the options that mean nothing for classification pre-training."""
    s = cfg.solver
    if not cfg.pretrain.images:
        raise ConfigError("pretrain.images: give an ImageFolder root (one sub-folder of images per class)")
    if cfg.pretrain.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"pretrain.lr_schedule: {cfg.pretrain.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if s.schedule:
        # The Nx rule is N x 90k iterations at 16 images with drops at total-60k/-20k: COCO detection's unit.
        raise ConfigError(f"solver.schedule={s.schedule!r}: the paper's Nx schedule is defined for detection training "
                          "(N x 90k iterations at 16 images) and means nothing for classification pre-training; set "
                          "solver.schedule='' and give the length as solver.max_iter (iterations) or solver.epochs "
                          "(passes over pretrain.images)")
    if cfg.model.init != "random":
        raise ConfigError(f"model.init={cfg.model.init!r}: pretrain trains the trunk from random initialization "
                          "(model.init is where a detection run's backbone comes from); set model.init=random")
    for key, value in (("solver.checkpoint_period", s.checkpoint_period), ("train.log_period", cfg.train.log_period),
                       ("pretrain.crop_size", cfg.pretrain.crop_size)):
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    if not 0 < cfg.pretrain.crop_scale <= 1:
        raise ConfigError(f"pretrain.crop_scale: an area fraction in (0, 1], got {cfg.pretrain.crop_scale}")


def build_dataset(cfg: Config) -> SeededImageFolder:
    """The ImageFolder of ``pretrain.images`` with random-resized crop and flip (``data.flip_prob``), after
    ``check_options``."""
    check_options(cfg)
    data = SeededImageFolder(cfg.pretrain.images, crop_size=cfg.pretrain.crop_size, flip_prob=cfg.data.flip_prob,
                            crop_scale=cfg.pretrain.crop_scale)
    if cfg.model.num_classes and cfg.model.num_classes != len(data.classes):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes}, but {cfg.pretrain.images} has "
                          f"{len(data.classes)} class folders; set model.num_classes=0 (the folders decide)")
    return data


def lr_lambda(cfg: Config, sched: Schedule) -> Callable[[int], float]:
    """The LR factor per iteration: warmup, then a cosine to 0 at the end, or the solver's steps."""
    s = cfg.solver

    def factor(it: int) -> float:
        if cfg.pretrain.lr_schedule == "cosine":  # the warmup of lr_factor, then a cosine instead of steps
            warm = lr_factor(it, steps=(), gamma=1.0, warmup_iters=sched.warmup_iters, warmup_factor=s.warmup_factor)
            return warm * 0.5 * (1 + math.cos(math.pi * it / sched.max_iter))
        return lr_factor(it, steps=sched.steps, gamma=s.gamma, warmup_iters=sched.warmup_iters,
                         warmup_factor=s.warmup_factor)

    return factor


def pretrain(cfg: Config, run_dir: str | Path, *, resume: bool = False, force: bool = False,
             progress: bool = True) -> Path:
    """Train the classifier (``resume``: from the run's newest valid checkpoint); returns ``backbone_final.pth``."""
    run_dir, data = Path(run_dir), build_dataset(cfg)  # the options refused before anything is written
    device, dtype, _, _ = start_run(cfg, run_dir, resume=resume, force=force, distributed=False)
    log.info("pretrain data: %s (%d images, %d classes)", cfg.pretrain.images, len(data), len(data.classes))
    # Linear scaling (solver.reference_batch_size) and solver.epochs as for detection; the Nx rule was refused above.
    sched = resolve_schedule(cfg.solver, len(data))
    model, s = build_classifier(cfg, len(data.classes), device), cfg.solver
    optimizer, scheduler, scaler = build_pretrain_solver(cfg, model, sched, dtype, device)
    describe_pretrain(cfg, model, sched, dtype, device, len(data.classes))
    start_iter, seen, window = resume_pretrain(cfg, run_dir, data, resume, model=model, optimizer=optimizer,
                                               scheduler=scheduler, scaler=scaler, device=device)
    record = RunRecord(run_dir, config=to_dict(cfg), start_iter=start_iter, resumed=seen is not None, seen=seen,
                       counts=("images_seen", "pixels_seen"))

    def check(iteration: int) -> None:
        check_nonfinite(window, iteration, limit=s.skip_nonfinite, scheduler=scheduler, run_dir=run_dir,
                        what="pretrain iteration")

    def save(name: str, iteration: int, keep: int = 0) -> None:
        check(iteration)
        # The trunk under "backbone" beside the whole classifier (torch.save stores shared storage once):
        # weights.read_weights then reads any checkpoint of this run, and its folder, as a pretrained backbone.
        record.checkpoint(name, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                          iteration=iteration, meta=pretrain_meta(cfg, data, record.reduce_seen()), window=window,
                          keep=keep, extra={"backbone": model.trunk.state_dict()})

    with StopSignal() as stop:  # before the loader: a signal while it starts still checkpoints
        sampler = PretrainSampler(len(data), batch_size=s.ims_per_batch, seed=cfg.train.seed, start=start_iter)
        # The loader's own generator: creating its iterator must not draw from the global torch RNG.
        loader = iter(DataLoader(data, batch_sampler=sampler, num_workers=cfg.dataloader.num_workers,
                                 worker_init_fn=worker_init, pin_memory=device.type == "cuda",
                                 generator=torch.Generator().manual_seed(cfg.train.seed)))
        params = [p for p in model.parameters() if p.requires_grad]
        clip = build_gradient_clipper(s.clip_gradients, value=s.clip_value, norm_type=s.clip_norm_type)
        model.train()
        bar = tqdm(total=sched.max_iter, initial=start_iter, desc="pretrain", file=sys.stderr, dynamic_ncols=True,
                   disable=not progress)
        timer = Throughput(device=device)
        try:
            for iteration in range(start_iter, sched.max_iter):
                images, labels = next(loader)
                record.add(len(images), len(images) * images.shape[-1] * images.shape[-2])
                lr = optimizer.param_groups[0]["lr"]
                loss, bad = classification_step(model, images, labels, optimizer=optimizer, scaler=scaler,
                                                params=params, dtype=dtype, device=device, clip=clip)
                scheduler.step()
                window.add(torch.stack([loss, loss]), bad, iteration)
                timer.step()
                done = iteration + 1
                if done % cfg.train.log_period == 0 or done == sched.max_iter:
                    line = log_line(window, timer, iteration=done, lr=lr, ims_per_batch=s.ims_per_batch,
                                    seen=record.reduce_seen(), keep=lambda m: {"loss": m["loss"]}, bar=bar)
                    check(iteration)
                    record.write(line)
                bar.update(1)
                periodic = done % s.checkpoint_period == 0 and done < sched.max_iter
                if periodic:
                    with timer.paused():
                        save(f"model_{done:07d}.pth", done, keep=s.keep_checkpoints)
                if stop.received() and done < sched.max_iter:
                    if not periodic:
                        save(f"model_{done:07d}.pth", done)
                    raise Preempted(f"received signal {stop.signum}: checkpoint written at iteration {done}; "
                                    f"continue with: scratchdet pretrain --resume {run_dir}")
            bar.close()
            # ---- the end: the backbone, then model_final.pth, which marks the run finished -----------
            check(sched.max_iter)
            out = run_dir / BACKBONE_FINAL
            ckpt.save_checkpoint(out, {"backbone": model.trunk.state_dict(),
                                       "meta": pretrain_meta(cfg, data, record.reduce_seen())})
            save(ckpt.FINAL, sched.max_iter)
        finally:
            bar.close()
            record.close()
    log.info("pretrained backbone written to %s (%d images seen); fine-tune with model.init=%s",
             out, record.seen["images_seen"], out)
    return out


def build_classifier(cfg: Config, num_classes: int, device: torch.device) -> Classifier:
    """The detector's trunk (same ``model.*`` options, same norm) under a linear classifier, on the device."""
    m = cfg.model
    model = Classifier(ResNet(**trunk_kwargs(m)), num_classes, m.pixel_mean, m.pixel_std).to(device)
    if use_channels_last(cfg.train.channels_last, device):  # before the optimizer: its momentum buffers take the layout
        model = model.to(memory_format=torch.channels_last)
    if m.norm == "SyncBN":
        log.info("model.norm=SyncBN: pretrain runs in one process, so batch statistics are this batch's (plain BN)")
    return model


def build_pretrain_solver(cfg: Config, model: Classifier, sched: Schedule, dtype: torch.dtype | None,
                          device: torch.device) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    """SGD, the LR schedule of ``lr_lambda`` and the fp16 scaler (off otherwise)."""
    s = cfg.solver
    # Norm scales/shifts at weight_decay_norm and biases at weight_decay_bias, as in detection training.
    optimizer = build_optimizer(model, base_lr=sched.base_lr, momentum=s.momentum, weight_decay=s.weight_decay,
                                weight_decay_norm=s.weight_decay_norm, weight_decay_bias=s.weight_decay_bias)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, sched))
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def describe_pretrain(cfg: Config, model: Classifier, sched: Schedule, dtype: torch.dtype | None,
                      device: torch.device, num_classes: int) -> None:
    """Log the schedule's notes, the classifier, its precision, clipping and the schedule."""
    m, s = cfg.model, cfg.solver
    for note in sched.notes:
        log.info("%s", note)
    channels_last = next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    log.info("classifier: R%d trunk, norm %s, %d classes, %s parameters; precision: %s%s [%s]", m.depth, m.norm,
             num_classes, f"{count_parameters(model)[0]:,}", precision_name(dtype),
             ", channels-last" if channels_last else "", precision_reason(cfg.train.amp, device))
    clipping = describe_clipping(s.clip_gradients, value=s.clip_value, norm_type=s.clip_norm_type)
    if clipping:
        log.info("%s", clipping)
    log.info("schedule: %d iterations of %d images, base LR %g, %s LR%s, warmup %d iterations", sched.max_iter,
             s.ims_per_batch, sched.base_lr, cfg.pretrain.lr_schedule,
             f" drops at {list(sched.steps)}" if cfg.pretrain.lr_schedule == "step" else "", sched.warmup_iters)


def resume_pretrain(cfg: Config, run_dir: Path, data: SeededImageFolder, resume: bool, *, model: Classifier,
                    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                    device: torch.device) -> tuple[int, dict[str, int] | None, LossWindow]:
    """With ``resume``, restore the newest valid checkpoint (of the same class folders); returns the iteration
    to start at, what was seen (None: a fresh run) and the loss window."""
    found = ckpt.latest_valid(run_dir) if resume else None
    if found is None:
        if resume:
            log.info("--resume: no checkpoint in %s yet, starting from scratch", run_dir)
        return 0, None, LossWindow(["loss_cls"], device)
    path, state = found
    if list(state["meta"]["classes"]) != data.classes:
        raise DataError(f"{path}: trained on the classes {state['meta']['classes']}, but {cfg.pretrain.images} now "
                        f"has {data.classes}; resume with the same folder, or start a new run")
    if state["meta"].get("images") != len(data):
        log.warning("%s: the run saw %s images in %s, which now holds %d: the image stream after the resume is "
                    "not the one the run would have seen", path, state["meta"].get("images"), cfg.pretrain.images,
                    len(data))
    restore_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    log.info("resumed from %s at iteration %d", path.name, int(state["iteration"]))
    return int(state["iteration"]), dict(state["seen"]), LossWindow.from_state(state["window"], device)


def pretrain_meta(cfg: Config, data: SeededImageFolder, seen: dict[str, int]) -> dict[str, Any]:
    """What ``weights.read_weights`` reads from a pretrain file (``seen`` becomes the fine-tuning run's pretrain_*)."""
    return {"format": "scratchdet-pretrain", "depth": cfg.model.depth, "norm": cfg.model.norm,
            "classes": list(data.classes), "images": len(data), "seen": dict(seen), "config": to_dict(cfg)}


def classification_step(model: Classifier, images: Tensor, labels: Tensor, *, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, params: list[nn.Parameter], dtype: torch.dtype | None,
                        device: torch.device, clip: GradientClipper | None = None) -> tuple[Tensor, Tensor]:
    """One SGD step on a batch of crops, as ``engine.train_step`` for detection; returns the loss and ``bad``
    (the step was skipped for a non-finite loss or gradient), both on the device."""
    channels_last = next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    images = images.to(device, non_blocking=True).float().contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    labels = labels.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(images)
    loss = nn.functional.cross_entropy(logits.float(), labels)
    return loss.detach(), optimize(loss, optimizer=optimizer, scaler=scaler, params=params, clip=clip)
