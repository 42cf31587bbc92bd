"""The training loop, top to bottom in one function (``train``), and evaluation of a run.

Read ``train`` from the top: set up the run folder, build data, model and solver, resume if
asked, then iterate: load a batch, compute the losses, stop on a non-finite one, step, log,
evaluate, checkpoint.  ``metrics.jsonl`` is the run's one record; everything else (reports,
comparisons) reads it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import Config, dump_yaml, resolve_schedule, short_schedule_warning, to_dict
from .data import CocoDetection, TrainSampler, build_transforms, draw_subset, resolve_datasets, test_loader, train_loader
from .evaluation import evaluate_model, load_gt
from .model import build_model, count_parameters, model_kwargs, norm_layers
from .weights import imagenet_source, load_backbone

log = logging.getLogger("scratchdet")


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN or Inf; the message names it, the iteration and the LR."""


class Preempted(SystemExit):
    """SIGTERM/SIGINT arrived; a checkpoint was written at the end of the iteration."""


def environment() -> dict[str, Any]:
    import torchvision

    return {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available() and torch.cuda.get_device_name(),
            "argv": sys.argv}


def setup_logging(run_dir: Path | None = None) -> None:
    log.setLevel(logging.INFO)
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in log.handlers):
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(fmt)
        log.addHandler(h)
    if run_dir is not None:
        for h in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            log.removeHandler(h)
            h.close()
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(fmt)
        log.addHandler(fh)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype; ``auto`` is bf16 where the hardware computes it natively (on a CPU
    without native bf16, emulated bf16 would be slower than fp32), else off."""
    if amp == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if native else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: Path, *, keep_until: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if keep_until is not None and self.path.exists():
            # Resuming from iteration N: what was logged after N is recomputed, so drop it.
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("iteration", 0) <= keep_until]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif keep_until is None:
            self.path.write_text("")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=keep_until)
        except ImportError:  # pragma: no cover - tensorboard is a dependency, but not a critical one
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "iteration" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["iteration"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def prepare_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse to overwrite a finished (or started) run unless ``--force``/``--resume`` say so."""
    if run_dir.exists() and not resume:
        if (run_dir / ckpt.FINAL).exists() or (run_dir / "metrics.jsonl").exists():
            if not force:
                raise FileExistsError(f"{run_dir} already holds a run; use --resume to continue it or --force to "
                                      "overwrite it")
            for p in list(run_dir.glob("model_*.pth*")) + [run_dir / "metrics.jsonl"]:
                p.unlink(missing_ok=True)
    if resume and (run_dir / ckpt.FINAL).exists() and not force:
        raise FileExistsError(f"{run_dir} holds a finished run ({ckpt.FINAL}); use --force to train it again")
    run_dir.mkdir(parents=True, exist_ok=True)


def build_eval(cfg: Config, val: tuple[str, str] | None) -> tuple[Any, Any] | tuple[None, None]:
    if val is None:
        return None, None
    dataset = CocoDetection(images=val[0], annotations=val[1], transforms=build_transforms(
        train=False, min_sizes=[cfg.data.min_size_test], max_size=cfg.data.max_size_test, flip_prob=0))
    loader = test_loader(dataset, batch_size=cfg.test.ims_per_batch, num_workers=cfg.dataloader.num_workers,
                         max_images=cfg.test.max_images)
    return loader, load_gt(val[1])


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, force: bool = False,
          dry_run: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or, with ``dry_run``, describe) a run; returns the final metrics."""
    run_dir = Path(run_dir)
    if not dry_run:
        prepare_run_dir(run_dir, resume=resume, force=force)
    setup_logging(None if dry_run else run_dir)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    device = pick_device(cfg.train.device)
    dtype = amp_dtype(cfg.train.amp, device)

    # ---- data: training stream, validation set --------------------------------------------
    train_paths, val_paths = resolve_datasets(cfg.data)
    if dry_run and not Path(train_paths[1]).is_file():
        # A dry run describes a preset before its data is in place (COCO presets, say).
        log.info("training data: %s not found; the model is built for model.num_classes=%d",
                 train_paths[1], cfg.model.num_classes)
        train_set = None
    else:
        train_set = CocoDetection(images=train_paths[0], annotations=train_paths[1],
                                  filter_empty=cfg.data.filter_empty,
                                  transforms=build_transforms(train=True, min_sizes=cfg.data.min_size_train,
                                                              max_size=cfg.data.max_size_train,
                                                              flip_prob=cfg.data.flip_prob))
        log.info("training data: %s (%d images, %d classes); %s", train_paths[1], len(train_set),
                 train_set.num_classes, train_set.report.summary())
        if cfg.data.subset:
            # The paper's data-size study (Sec. 5.3): random subsets, nested for one seed (1k in 10k in 35k).
            ids = draw_subset(train_set.image_ids(), cfg.data.subset, cfg.data.subset_seed)
            train_set.keep(ids)
            log.info("data.subset=%g (seed %d): training on %d images", cfg.data.subset, cfg.data.subset_seed, len(ids))

    # ---- model, solver ----------------------------------------------------------------------
    model = build_model(**model_kwargs(cfg.model, train_set.num_classes if train_set else None)).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    init_meta: dict[str, Any] = {}
    if dry_run and cfg.model.init == "imagenet":
        # Describe, do not download: a dry run must work offline.
        log.info("backbone would be initialized from %s", imagenet_source(cfg.model.depth, cfg.model.norm))
    elif cfg.model.init != "random":
        init_meta = load_backbone(model.backbone.body, cfg.model.init, depth=cfg.model.depth, norm=cfg.model.norm)
    # What the pre-training stage saw, carried into every log line (the paper's "images seen" comparisons).
    pretrain_seen = {f"pretrain_{k}": v for k, v in init_meta.get("seen", {}).items()}
    n_params, n_trainable = count_parameters(model)
    sched = resolve_schedule(cfg.solver, len(train_set) if train_set else None)
    for note in sched.notes:
        log.info("%s", note)
    warning = short_schedule_warning(cfg.model.init, sched.max_iter * cfg.solver.ims_per_batch)
    if warning:
        log.warning("%s", warning)
    log.info("model: Mask R-CNN R%d-FPN, norm %s, %s parameters (%s trainable), init %s", cfg.model.depth,
             cfg.model.norm, f"{n_params:,}", f"{n_trainable:,}", cfg.model.init)
    log.info("precision: %s%s", {None: "fp32"}.get(dtype, str(dtype).replace("torch.", "")),
             ", channels-last" if cfg.train.channels_last else "")
    log.info("schedule: %d iterations of %d images, base LR %g, LR drops at %s, warmup %d iterations",
             sched.max_iter, cfg.solver.ims_per_batch, sched.base_lr, list(sched.steps), sched.warmup_iters)
    summary = {"parameters": n_params, "trainable_parameters": n_trainable, "max_iter": sched.max_iter,
               "base_lr": sched.base_lr, "steps": list(sched.steps), "warmup_iters": sched.warmup_iters,
               "ims_per_batch": cfg.solver.ims_per_batch, "train_images": len(train_set) if train_set else None,
               "num_classes": model.roi_heads.box_predictor.cls_score.out_features - 1,
               "norm_layers": sorted({type(m).__name__ for _, m in norm_layers(model)})}
    if dry_run:
        return summary
    assert train_set is not None
    from .solver import build_lr_scheduler, build_optimizer

    optimizer = build_optimizer(model, base_lr=sched.base_lr, momentum=cfg.solver.momentum,
                                weight_decay=cfg.solver.weight_decay, weight_decay_norm=cfg.solver.weight_decay_norm,
                                weight_decay_bias=cfg.solver.weight_decay_bias)
    scheduler = build_lr_scheduler(optimizer, steps=sched.steps, gamma=cfg.solver.gamma,
                                   warmup_iters=sched.warmup_iters, warmup_factor=cfg.solver.warmup_factor)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    meta = {"class_names": train_set.class_names, "label_to_cat_id": train_set.label_to_cat_id}

    # ---- resume: model, solver, RNG and the sampler's position --------------------------------
    start_iter, seen = 0, {"images_seen": 0, "instances_seen": 0, "pixels_seen": 0}
    window: dict[str, float] = {}  # loss sums since the last log line (checkpointed: a resumed log is the same)
    n_window, skipped = 0, 0
    found = ckpt.latest_valid(run_dir) if resume else None
    if found is not None:
        path, state = found
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        start_iter, seen = int(state["iteration"]), dict(state["seen"])
        window, n_window, skipped = dict(state["window"]), int(state["n_window"]), int(state["skipped"])
        log.info("resumed from %s at iteration %d", path, start_iter)
    elif resume:
        log.info("--resume: no checkpoint in %s yet, starting from scratch", run_dir)
    dump_yaml(cfg, run_dir / "config.yaml")
    if cfg.data.subset:
        (run_dir / "subset_image_ids.json").write_text(json.dumps(train_set.image_ids()))
    (run_dir / "env.json").write_text(json.dumps(environment(), indent=1))
    metrics = MetricsWriter(run_dir, keep_until=start_iter if found is not None else None)
    eval_loader, gt = build_eval(cfg, val_paths)

    def evaluate(iteration: int) -> dict[str, Any]:
        bar = tqdm(total=len(eval_loader.dataset), desc="eval", leave=False, disable=not progress, file=sys.stderr)
        with bar:
            result = evaluate_model(model, eval_loader, gt=gt, device=device, label_to_cat_id=train_set.label_to_cat_id,
                                    amp_dtype=dtype, results_path=run_dir / "coco_instances_results.json",
                                    progress=bar)
        record = {"iteration": iteration, **result}
        metrics.write(record)
        log.info("iteration %d: bbox/AP %.2f  segm/AP %.2f", iteration, result["bbox/AP"], result["segm/AP"])
        return record

    def save(name: str, iteration: int) -> None:
        ckpt.save_checkpoint(run_dir / name, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "iteration": iteration, "rng": ckpt.rng_state(), "seen": seen,
            "meta": meta, "config": to_dict(cfg), "window": window, "n_window": n_window, "skipped": skipped})

    # SIGTERM/SIGINT (a cluster's preemption, a Ctrl-C): finish the iteration, checkpoint, exit.
    stop = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    # ---- the loop -------------------------------------------------------------------------------
    sampler = TrainSampler(train_set.aspect_ratios(), batch_size=cfg.solver.ims_per_batch, seed=cfg.train.seed,
                           start=start_iter, group_by_aspect=cfg.dataloader.aspect_ratio_grouping)
    loader = iter(train_loader(train_set, sampler, num_workers=cfg.dataloader.num_workers, seed=cfg.train.seed))
    model.train()
    bar = tqdm(total=sched.max_iter, initial=start_iter, desc="train", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    t_window, n_timed = time.perf_counter(), 0
    last_eval: dict[str, Any] = {}
    try:
        for iteration in range(start_iter, sched.max_iter):
            images, targets = next(loader)
            images = [im.to(device, non_blocking=True).float() for im in images]
            targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device),
                        "masks": t["masks"].to(device)} for t in targets]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss_dict = model(images, targets)
            losses = sum(loss_dict.values())
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses).backward()
            # Stop on a non-finite loss or gradient (as torchvision's reference engine does for the
            # loss), naming the culprit; or skip the step, a bounded number of times.  With fp16 the
            # GradScaler already skips steps whose gradients overflow.
            bad = [] if torch.isfinite(losses) else [k for k, v in loss_dict.items() if not torch.isfinite(v)]
            if not bad and dtype != torch.float16:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
                if not torch.isfinite(grad_norm):
                    bad = ["gradient norm"]
            if bad:
                where = f"{', '.join(bad)} at iteration {iteration} (lr {lr:g})"
                if skipped >= cfg.solver.skip_nonfinite:
                    raise NonFiniteLossError(f"non-finite {where}; the last good checkpoint is kept in {run_dir}")
                skipped += 1
                log.warning("non-finite %s: step skipped (%d of solver.skip_nonfinite=%d)", where, skipped,
                            cfg.solver.skip_nonfinite)
                metrics.write({"iteration": iteration + 1, "skipped_step": where})
                optimizer.zero_grad(set_to_none=True)
            else:
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()

            seen["images_seen"] += len(images)
            seen["instances_seen"] += sum(len(t["labels"]) for t in targets)
            seen["pixels_seen"] += sum(im.shape[-1] * im.shape[-2] for im in images)
            if not bad:
                for k, v in loss_dict.items():
                    window[k] = window.get(k, 0.0) + float(v.detach())
                window["loss"] = window.get("loss", 0.0) + float(losses.detach())
                n_window += 1
            n_timed += 1
            done = iteration + 1
            if (done % cfg.train.log_period == 0 or done == sched.max_iter) and n_window:
                elapsed = time.perf_counter() - t_window
                record = {"iteration": done, **{k: round(v / n_window, 5) for k, v in window.items()}, "lr": lr,
                          "images_per_sec": round(n_timed * cfg.solver.ims_per_batch / elapsed, 3),
                          "time_per_iter": round(elapsed / n_timed, 4), **seen, **pretrain_seen}
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2g}", ips=f"{record['images_per_sec']:.1f}")
                window, t_window, n_window, n_timed = {}, time.perf_counter(), 0, 0
            bar.update(1)
            if eval_loader is not None and cfg.test.eval_period and done % cfg.test.eval_period == 0 \
                    and done < sched.max_iter:
                last_eval = evaluate(done)
            if done % cfg.solver.checkpoint_period == 0 and done < sched.max_iter:
                save(f"model_{done:07d}.pth", done)
                ckpt.prune(run_dir, cfg.solver.keep_checkpoints)
            if stop["signal"] is not None and done < sched.max_iter:
                save(f"model_{done:07d}.pth", done)
                raise Preempted(f"received signal {stop['signal']}: checkpoint written at iteration {done}; "
                                f"continue with: scratchdet train --resume {run_dir}")
        bar.close()
        # ---- the end: final weights, final evaluation ------------------------------------------
        save(ckpt.FINAL, sched.max_iter)
        if eval_loader is not None:
            last_eval = evaluate(sched.max_iter)
    finally:
        bar.close()
        metrics.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    (run_dir / "final.json").write_text(json.dumps({**summary, **seen, **pretrain_seen, **last_eval}, indent=1))
    return {**summary, **seen, **pretrain_seen, **last_eval}


def load_run_model(run_dir: str | Path, checkpoint: str | Path | None = None,
                   device: torch.device | None = None) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """A trained run's model (``model_final.pth`` or the newest valid checkpoint), config and meta."""
    from .config import from_dict

    run_dir = Path(run_dir)
    if checkpoint is None:
        if (run_dir / ckpt.FINAL).exists():
            state = ckpt.load_checkpoint(run_dir / ckpt.FINAL)
        else:
            found = ckpt.latest_valid(run_dir)
            if found is None:
                raise FileNotFoundError(f"{run_dir}: no {ckpt.FINAL} and no valid periodic checkpoint")
            state = found[1]
    else:
        state = ckpt.load_checkpoint(checkpoint)
    cfg = from_dict(state["config"])
    meta = state["meta"]
    model = build_model(**model_kwargs(cfg.model, len(meta["class_names"])))
    model.load_state_dict(state["model"])
    model.to(device or pick_device(cfg.train.device)).eval()
    return model, cfg, meta
