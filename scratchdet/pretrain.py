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

import json
import logging
import math
import signal
import sys
import time
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
from .config import Config, ConfigError, Schedule, dump_yaml, resolve_schedule, to_dict
from .data import DataError
from .data import _worker_init as worker_init  # one thread per worker; workers leave SIGTERM/SIGINT to the main process
from .model import ResNet, count_parameters, trunk_kwargs
from .run import (
    LossWindow,
    MetricsWriter,
    NonFiniteLossError,
    Preempted,
    amp_dtype,
    environment,
    pick_device,
    precision_name,
    precision_reason,
    prepare_run_dir,
    restore_training_state,
    save_training_state,
    seed_everything,
    setup_logging,
    sync_device,
    use_channels_last,
    use_deterministic,
)
from .solver import build_gradient_clipper, build_optimizer, describe_clipping, lr_factor, skip_nonfinite_step

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
    """The ImageFolder of ``pretrain.images`` with random-resized crop and flip (``data.flip_prob``)."""
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
    run_dir = Path(run_dir)
    check_options(cfg)
    data = build_dataset(cfg)
    device = pick_device(cfg.train.device)
    prepare_run_dir(run_dir, resume=resume, force=force)  # a finished run (model_final.pth) needs --force
    setup_logging(run_dir)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed, use_deterministic(cfg.train.deterministic, device),
                    strict=cfg.train.deterministic == "on")
    channels_last = use_channels_last(cfg.train.channels_last, device)
    dtype = amp_dtype(cfg.train.amp, device)
    log.info("pretrain data: %s (%d images, %d classes)", cfg.pretrain.images, len(data), len(data.classes))
    # Linear scaling (solver.reference_batch_size) and solver.epochs as for detection; the Nx rule was refused above.
    sched = resolve_schedule(cfg.solver, len(data))
    for note in sched.notes:
        log.info("%s", note)

    # ---- model and solver -----------------------------------------------------------------------
    m, s = cfg.model, cfg.solver
    trunk = ResNet(**trunk_kwargs(m))
    model = Classifier(trunk, len(data.classes), m.pixel_mean, m.pixel_std).to(device)
    if channels_last:  # before the optimizer: its momentum buffers take the parameters' layout
        model = model.to(memory_format=torch.channels_last)
    if m.norm == "SyncBN":
        log.info("model.norm=SyncBN: pretrain runs in one process, so batch statistics are this batch's (plain BN)")
    # Norm scales/shifts at weight_decay_norm and biases at weight_decay_bias, as in detection training.
    optimizer = build_optimizer(model, base_lr=sched.base_lr, momentum=s.momentum, weight_decay=s.weight_decay,
                                weight_decay_norm=s.weight_decay_norm, weight_decay_bias=s.weight_decay_bias)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, sched))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    n_params, _ = count_parameters(model)
    log.info("classifier: R%d trunk, norm %s, %d classes, %s parameters; precision: %s%s [%s]", m.depth, m.norm,
             len(data.classes), f"{n_params:,}", precision_name(dtype), ", channels-last" if channels_last else "",
             precision_reason(cfg.train.amp, device))
    clipping = describe_clipping(s.clip_gradients, value=s.clip_value, norm_type=s.clip_norm_type)
    if clipping:
        log.info("%s", clipping)
    log.info("schedule: %d iterations of %d images, base LR %g, %s LR%s, warmup %d iterations", sched.max_iter,
             s.ims_per_batch, sched.base_lr, cfg.pretrain.lr_schedule,
             f" drops at {list(sched.steps)}" if cfg.pretrain.lr_schedule == "step" else "", sched.warmup_iters)

    # ---- resume: model, solver, RNG, counters and the stream's position (the iteration) ------------
    start_iter, seen = 0, {"images_seen": 0, "pixels_seen": 0}
    window = LossWindow(["loss_cls"], device)
    found = ckpt.latest_valid(run_dir) if resume else None
    if found is not None:
        path, state = found
        if list(state["meta"]["classes"]) != data.classes:
            raise DataError(f"{path}: trained on the classes {state['meta']['classes']}, but {cfg.pretrain.images} now "
                            f"has {data.classes}; resume with the same folder, or start a new run")
        if state["meta"].get("images") != len(data):
            log.warning("%s: the run saw %s images in %s, which now holds %d: the image stream after the resume is "
                        "not the one the run would have seen", path, state["meta"].get("images"), cfg.pretrain.images,
                        len(data))
        restore_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start_iter, seen = int(state["iteration"]), dict(state["seen"])
        window = LossWindow.from_state(state["window"], device)
        log.info("resumed from %s at iteration %d", path.name, start_iter)
    elif resume:
        log.info("--resume: no checkpoint in %s yet, starting from scratch", run_dir)
    dump_yaml(cfg, run_dir / "config.yaml")
    (run_dir / "env.json").write_text(json.dumps(environment(), indent=1))
    metrics = MetricsWriter(run_dir, keep_until=start_iter if found else None)

    def meta() -> dict[str, Any]:
        """What ``weights.read_weights`` reads from a pretrain file (``seen`` becomes the fine-tuning run's pretrain_*)."""
        return {"format": "scratchdet-pretrain", "depth": m.depth, "norm": m.norm, "classes": list(data.classes),
                "images": len(data), "seen": dict(seen), "config": to_dict(cfg)}

    def check_nonfinite(iteration: int) -> None:
        """Stop when more steps were skipped than solver.skip_nonfinite allows (a host sync)."""
        n, first, terms = window.nonfinite()
        if n > s.skip_nonfinite:
            lr = sched.base_lr * scheduler.lr_lambdas[0](first)
            raise NonFiniteLossError(
                f"non-finite {', '.join(terms)} at pretrain iteration {first} (lr {lr:g}); "
                f"{n} step(s) skipped by iteration {iteration} (solver.skip_nonfinite={s.skip_nonfinite}); the last good "
                f"checkpoint is kept in {run_dir}")

    def save(name: str, iteration: int) -> None:
        check_nonfinite(iteration)
        # The trunk under "backbone" beside the whole classifier (torch.save stores shared storage once):
        # weights.read_weights then reads any checkpoint of this run, and its folder, as a pretrained backbone.
        save_training_state(run_dir / name, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            iteration=iteration, meta=meta(), config=to_dict(cfg),
                            progress={"seen": dict(seen), "window": window.state(), "backbone": trunk.state_dict()})

    # SIGTERM/SIGINT (a cluster's preemption, a Ctrl-C): finish the iteration, checkpoint, exit.
    stop: dict[str, int | None] = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    # ---- the loop -------------------------------------------------------------------------------
    sampler = PretrainSampler(len(data), batch_size=s.ims_per_batch, seed=cfg.train.seed, start=start_iter)
    # The loader's own generator: creating its iterator must not draw from the global torch RNG.
    loader = iter(DataLoader(data, batch_sampler=sampler, num_workers=cfg.dataloader.num_workers,
                             worker_init_fn=worker_init, pin_memory=device.type == "cuda",
                             generator=torch.Generator().manual_seed(cfg.train.seed)))
    params = [p for p in model.parameters() if p.requires_grad]
    clip = build_gradient_clipper(cfg.solver.clip_gradients, value=cfg.solver.clip_value,
                                  norm_type=cfg.solver.clip_norm_type)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    bar = tqdm(total=sched.max_iter, initial=start_iter, desc="pretrain", file=sys.stderr, dynamic_ncols=True,
               disable=not progress)
    # images/s counts training only: checkpoint time inside a window is taken out.
    t_window, n_timed, t_other = time.perf_counter(), 0, 0.0
    model.train()
    try:
        for iteration in range(start_iter, sched.max_iter):
            images, labels = next(loader)
            seen["images_seen"] += len(images)
            seen["pixels_seen"] += len(images) * images.shape[-1] * images.shape[-2]
            images = images.to(device, non_blocking=True).float().contiguous(memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(images)
            loss = nn.functional.cross_entropy(logits.float(), labels)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # A non-finite loss or gradient skips the step, flagged on the device (no host sync per
            # step); the GradScaler skips fp16 overflows by itself.  The host reads the count at log lines.
            if dtype == torch.float16:
                bad = ~torch.isfinite(loss.detach())
                if clip is not None:  # on the true gradients: the scaler's factor divided out first
                    scaler.unscale_(optimizer)
                    clip([p.grad for p in params if p.grad is not None], None)
            else:
                grads = [p.grad for p in params if p.grad is not None]
                grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                bad = ~torch.isfinite(loss.detach() + grad_norm)
                if clip is not None:
                    clip(grads, grad_norm)
            if scaler.is_enabled():
                scaler.step(optimizer)
                scaler.update()
            else:
                skip_nonfinite_step(optimizer, bad)
            scheduler.step()
            window.add(torch.stack([loss.detach(), loss.detach()]), bad, iteration)
            n_timed += 1
            done = iteration + 1
            if done % cfg.train.log_period == 0 or done == sched.max_iter:
                means, steps = window.read()
                check_nonfinite(iteration)
                elapsed = time.perf_counter() - t_window - t_other
                n, first, terms = window.nonfinite()
                record = {"iteration": done, **({"loss": means["loss"]} if steps else {}), "lr": lr,
                          "images_per_sec": round(n_timed * s.ims_per_batch / elapsed, 3),
                          "time_per_iter": round(elapsed / n_timed, 4), **seen}
                if n:
                    record.update(skipped_steps=n, skipped_step=f"{', '.join(terms)} at iteration {first}")
                metrics.write(record)
                if steps:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2g}", ips=f"{record['images_per_sec']:.1f}")
                t_window, n_timed, t_other = time.perf_counter(), 0, 0.0
            bar.update(1)
            periodic = done % s.checkpoint_period == 0 and done < sched.max_iter
            if periodic:
                sync_device(device)  # the steps queued before the checkpoint are training time
                t_pause = time.perf_counter()
                save(f"model_{done:07d}.pth", done)
                ckpt.prune(run_dir, s.keep_checkpoints)
                t_other += time.perf_counter() - t_pause
            if stop["signal"] is not None and done < sched.max_iter:
                if not periodic:
                    save(f"model_{done:07d}.pth", done)
                raise Preempted(f"received signal {stop['signal']}: checkpoint written at iteration {done}; continue "
                                f"with: scratchdet pretrain --resume {run_dir}")
        bar.close()
        # ---- the end: the backbone, then model_final.pth, which marks the run finished -----------
        check_nonfinite(sched.max_iter)
        out = run_dir / BACKBONE_FINAL
        ckpt.save_checkpoint(out, {"backbone": trunk.state_dict(), "meta": meta()})
        save(ckpt.FINAL, sched.max_iter)
    finally:
        bar.close()
        metrics.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    log.info("pretrained backbone written to %s (%d images seen); fine-tune with model.init=%s",
             out, seen["images_seen"], out)
    return out
