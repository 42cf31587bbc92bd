"""Detection training, top to bottom in one function (``train``), and its step (``train_step``).

Read ``train`` from the top: set up the run (``loop.start_run``), build data, model and solver,
resume if asked, then iterate: load a batch, step (a non-finite loss or gradient skips it on the
device), log, evaluate, checkpoint.  What ``train`` shares with ``pretrain`` (signals, throughput,
the non-finite check, the log line) is in ``loop``; the run directory, the metrics writer and
checkpoints in ``run``; evaluation in ``evaluation``; schedule branching in ``branching``.
``metrics.jsonl`` is the run's one record, and everything else (reports, comparisons) reads it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed as dist
from .branching import branch_name, branch_point, check_keep_at, needs_end_line, start_branch
from .config import Config, ConfigError, set_key, to_dict
from .data import (
    CocoDetection,
    TrainSampler,
    batch_sizes,
    build_lsj_transforms,
    build_transforms,
    check_categories,
    draw_subset,
    resolve_datasets,
    train_loader,
)
from .device import precision_name, precision_reason, use_channels_last
from .layers import sampling_seeds
from .loop import StopSignal, Throughput, check_nonfinite, log_line, optimize, start_run
from .model import build_model, count_parameters
from .norm import norm_layers
from .run import LossWindow, Preempted, RunRecord, latest_checkpoint, on_main, restore_training_state
from .schedule import Schedule, check_schedule, resolve_schedule, short_schedule_warning
from .solver import (
    GradientClipper,
    build_gradient_clipper,
    build_lr_scheduler,
    build_optimizer,
    describe_clipping,
)
from .voc import VOC_MEANS, load_voc, voc_present
from .weights import imagenet_source, load_init

log = logging.getLogger("scratchdet")


def build_data(cfg: Config, *, dry_run: bool) -> tuple[CocoDetection | None, tuple[str, str] | None]:
    """The training set (None in a dry run before the data is in place) and the validation files."""
    if not dry_run and dist.world_size() > 1 and dist.is_main():
        resolve_datasets(cfg.data)  # rank 0 generates the synthetic data (when used) while the others wait
    dist.barrier()
    train_paths, val_paths = resolve_datasets(cfg.data)
    if not dry_run:
        return build_train_set(cfg, train_paths), val_paths
    missing = preset_data_missing(cfg, "train", train_paths)
    if missing:
        if not cfg.model.num_classes:
            raise ConfigError(f"model.num_classes: unknown without the training set ({missing} not found); set it "
                              "(80 for COCO) to describe the model without the data")
        log.info("not checked: training data %s not found (the preset's own path; give data.train.images and "
                 "data.train.annotations to check yours); the model is built for model.num_classes=%d", missing,
                 cfg.model.num_classes)
        return None, val_paths
    train_set = build_train_set(cfg, train_paths)
    check_data(cfg, train_set, val_paths)
    return train_set, val_paths


def preset_data_missing(cfg: Config, split: str, paths: tuple[str, str]) -> str | None:
    """For a dry run: what of the split's data is missing where a built-in preset (not the user) named it; else None.

    Our choice: a dry run reads what the run reads, and a file it cannot read is an error there as in
    the run, for every path the user gave (a data.* override, or a YAML file of their own). The one exception is
    a built-in preset's own path (COCO or VOC under datasets/): any preset dry-runs on a machine without its
    dataset, saying "not checked: ... not found", so that a preset can be described before its data is in place.
    """
    ds = getattr(cfg.data, split)
    if not ds.annotations or {f"data.{split}.images", f"data.{split}.annotations"} & cfg.given_keys:
        return None  # the synthetic data (generated), or the user's own files (checked)
    if ds.format == "voc":
        return None if voc_present(*paths) else f"image set {paths[1]} of {paths[0]}"
    return None if Path(paths[1]).is_file() else paths[1]


def check_data(cfg: Config, train_set: CocoDetection, val_paths: tuple[str, str] | None) -> None:
    """A dry run's checks of the data (the training set read, the run's own loading code): the validation set
    read as evaluation reads it, its categories against the training set's, and every image either set would
    load opened (header and size; ``data.check_images``). A failure raises DataError naming the file and image."""
    from .data import check_images
    from .evaluation import build_eval

    log.info("check passed: training set read; %d images open as images of their annotated size", check_images(train_set))
    if val_paths is None:
        log.info("no validation set (data.val.*): nothing evaluated")
        return
    missing = preset_data_missing(cfg, "val", val_paths)
    if missing:
        log.info("not checked: validation data %s not found (the preset's own path; give data.val.images and "
                 "data.val.annotations to check yours)", missing)
        return
    loader, _ = build_eval(cfg, val_paths, class_names=train_set.class_names)
    voc = cfg.data.val.format == "voc"
    if not voc:
        check_categories(train_set.label_to_cat_id, val_paths[1], what="validation set")
    subset = loader.dataset
    n = check_images(subset.dataset, subset.indices)
    log.info("check passed: validation set %s read (%d images%s); %d images open as images of their annotated "
             "size", val_paths[1] if not voc else f"{val_paths[1]} of {val_paths[0]}", len(subset.dataset),
             "" if voc else ", the training set's categories", n)


def build_detector(cfg: Config, train_set: CocoDetection | None, device: torch.device, *,
                   dry_run: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model on its device and memory format, initialized as ``model.init`` says; and what the
    initialization loaded (``weights.load_init``'s meta)."""
    model = build_model(cfg.model, num_classes=train_set.num_classes if train_set else None,
                        num_keypoints=getattr(train_set, "num_keypoints", None)).to(device)
    if use_channels_last(cfg.train.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    init_meta: dict[str, Any] = {}
    if dry_run and cfg.model.init == "imagenet":
        # Describe, do not download: a dry run must work offline.
        log.info("backbone would be initialized from %s", imagenet_source(cfg.model.depth, cfg.model.norm))
    elif cfg.model.init != "random":
        init_meta = load_init(model, cfg.model.init, depth=cfg.model.depth, norm=cfg.model.norm)
    if cfg.model.norm == "SyncBN" and dist.world_size() == 1:
        log.info("model.norm=SyncBN in a single process: batch statistics come from this process's batch only "
                 "(plain BN); launch with torchrun for statistics across processes")
    return model, init_meta


def build_train_set(cfg: Config, train_paths: tuple[str, str]) -> CocoDetection:
    """The training set (COCO JSON, or VOC with ``data.train.format: voc``) with its augmentation, cut to
    ``data.subset`` when set."""
    transforms = build_transforms(train=True, min_sizes=cfg.data.min_size_train, max_size=cfg.data.max_size_train,
                                  flip_prob=cfg.data.flip_prob)
    if cfg.data.lsj:
        # detectron2's new baselines: large-scale jitter for training only; test images keep data.*_size_test.
        transforms = build_lsj_transforms(size=cfg.data.lsj_size, scale=cfg.data.lsj_scale, flip_prob=cfg.data.flip_prob)
    if cfg.data.train.format == "voc":
        # Difficult objects stay in the targets, as detectron2 trains on VOC; VocDetection explains why.
        train_set = load_voc(train_paths[0], train_paths[1], transforms=transforms,
                             filter_empty=cfg.data.filter_empty)
    else:
        train_set = CocoDetection(images=train_paths[0], annotations=train_paths[1],
                                  filter_empty=cfg.data.filter_empty, transforms=transforms, task=cfg.model.task)
    where = f"{train_paths[0]} ({train_paths[1]})" if cfg.data.train.format == "voc" else train_paths[1]
    log.info("training data: %s (%d images, %d class%s); %s", where, len(train_set), train_set.num_classes,
             "" if train_set.num_classes == 1 else "es",
             train_set.report.summary())
    if cfg.data.subset:
        # The paper's data-size study (Sec. 5.2, Figs. 7-8): random subsets, nested for one seed (1k in 10k in 35k).
        ids = draw_subset(train_set.image_ids(), cfg.data.subset, cfg.data.subset_seed)
        train_set.keep(ids)
        log.info("data.subset=%g (seed %d): training on %d images", cfg.data.subset, cfg.data.subset_seed, len(ids))
    if cfg.data.fit:
        apply_fit(cfg, train_set)
    return train_set


# Keys data.fit sets together: a length given in part (max_iter without steps) would not be one schedule, and an
# input size given in part would leave the anchors and the length fitted to another size.
FIT_LENGTH_KEYS = ("solver.max_iter", "solver.steps", "solver.warmup_iters", "solver.schedule", "solver.epochs",
                   "solver.reference_batch_size")
FIT_SIZE_KEYS = ("data.min_size_train", "data.max_size_train", "data.min_size_test", "data.max_size_test")


def apply_fit(cfg: Config, train_set: CocoDetection) -> None:
    """``data.fit``: set the input size, anchors and length that ``datafit.fit_recipe`` chooses from the training
    set, except the keys the user gave (a length given in part keeps the whole length); log what and why."""
    from .datafit import fit_recipe

    if cfg.data.lsj:
        raise ConfigError("data.fit sizes the plain resize (data.min_size_train ...); it does not fit data.lsj")
    size_given = sorted(set(FIT_SIZE_KEYS) & cfg.given_keys)
    sizes = sorted(cfg.data.min_size_train)
    fit = fit_recipe(train_set.records, ims_per_batch=cfg.solver.ims_per_batch,
                     aspect_ratios=tuple(cfg.model.anchor_aspect_ratios),
                     side=sizes[len(sizes) // 2] if size_given else None)
    length_given = sorted(set(FIT_LENGTH_KEYS) & cfg.given_keys)
    kept = [k for k in fit.overrides if k in cfg.given_keys or (k in FIT_LENGTH_KEYS and length_given)
            or (k in FIT_SIZE_KEYS and size_given)]
    for key, value in fit.overrides.items():
        if key not in kept:
            set_key(cfg, key, value)
    s = cfg.solver
    if not length_given and (s.schedule or s.epochs or s.reference_batch_size):
        # The fitted length is in iterations of solver.ims_per_batch images: a preset's Nx rule, epochs or
        # linear scaling would rescale it.  The LR stays what the preset's scaling gives at this batch.
        lr = s.base_lr * s.ims_per_batch / s.reference_batch_size if s.reference_batch_size else s.base_lr
        for key, value in (("solver.schedule", ""), ("solver.epochs", 0.0), ("solver.reference_batch_size", 0),
                           ("solver.base_lr", lr)):
            set_key(cfg, key, value)
        fit.reasons.append(f"the preset's schedule rule off (solver.schedule, solver.epochs, "
                           f"solver.reference_batch_size): the fitted length as it stands, base LR {lr:g}")
    for reason in fit.reasons:
        log.info("data.fit: %s", reason)
    if kept:
        log.info("data.fit: kept as given %s%s", ", ".join(kept),
                 f" (the length is given by {', '.join(length_given)})" if length_given else "")
    for warning in fit.warnings if dist.is_main() else ():
        log.warning("data.fit: %s", warning)
    train_set.transforms = build_transforms(train=True, min_sizes=cfg.data.min_size_train,
                                            max_size=cfg.data.max_size_train, flip_prob=cfg.data.flip_prob)


# What the detectors read from a target; the loader's other keys (image_id, seed, orig_size) stay here.
TARGET_KEYS = ("boxes", "labels", "masks", "keypoints")


def train_step(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict[str, Any]], *,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[torch.nn.Parameter],
               dtype: torch.dtype | None, device: torch.device, names: list[str] | None = None,
               clip: GradientClipper | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """One SGD step on a batch from the loader, without waiting for the device.

    Returns the loss names, the losses [L + 1] (each loss in ``names`` order, then their sum) and
    ``bad``, a device bool: the step was skipped for a non-finite loss or gradient on some rank.
    ``clip`` (``solver.build_gradient_clipper``) bounds the gradients before the step.
    """
    seeds = [t["seed"] for t in targets]  # each image draws its anchor and RoI samples from its own seed
    images = [im.to(device, non_blocking=True).float() for im in images]
    targets = [{k: t[k].to(device, non_blocking=True) for k in TARGET_KEYS if k in t} for t in targets]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), sampling_seeds(seeds):
        loss_dict = model(images, targets)
    names = names or list(loss_dict)
    losses = torch.stack([loss_dict[k] for k in names])
    total = losses.sum()
    bad = optimize(total, optimizer=optimizer, scaler=scaler, params=params, clip=clip)
    return names, torch.cat([losses.detach(), total.detach()[None]]), bad


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, force: bool = False,
          dry_run: bool = False, progress: bool = True, keep_at: tuple[int, ...] = (),
          branch_from: str | Path | None = None) -> dict[str, Any]:
    """Train (or, with ``dry_run``, describe) a run; returns the final metrics.

    Under ``torchrun`` every rank runs this function: each takes its slice of every global batch,
    DDP averages the gradients, and rank 0 alone writes the run directory.  Schedule branching
    (``branching``): ``keep_at`` saves the trunk's state at those iterations; ``branch_from``
    starts this run from such a trunk at its own first LR drop, where the two runs part.
    """
    run_dir = Path(run_dir)
    device, dtype, resume, force = start_run(cfg, run_dir, resume=resume or branch_from is not None, force=force,
                                             dry_run=dry_run)
    rank, world = dist.rank(), dist.world_size()
    if cfg.solver.ims_per_batch % world:
        raise ConfigError(f"solver.ims_per_batch={cfg.solver.ims_per_batch} is the global batch and must divide "
                          f"among the {world} processes")

    # ---- data, model, schedule ------------------------------------------------------------------
    train_set, val_paths = build_data(cfg, dry_run=dry_run)
    model, init_meta = build_detector(cfg, train_set, device, dry_run=dry_run)
    # What a pre-training stage saw, carried into every log line (the paper's "images seen" comparisons).
    pretrain_seen = {f"pretrain_{k}": v for k, v in init_meta.get("seen", {}).items()}
    sched = resolve_schedule(cfg.solver, len(train_set) if train_set else None)
    check_schedule(sched)
    summary = describe_run(cfg, model, sched, dtype, train_set, device)
    check_keep_at(keep_at, sched)
    if dry_run:
        return summary
    assert train_set is not None
    if branch_from is not None:
        on_main(start_branch, branch_from, run_dir, branch_point(sched), config=to_dict(cfg),
                num_images=len(train_set), end=sched.max_iter)

    # ---- solver; resume: model, solver, RNG and the sampler's position ----------------------------
    optimizer, scheduler, scaler = build_solver(cfg, model, sched, dtype, device)
    start_iter, seen, window = resume_from(run_dir, resume, model=model, optimizer=optimizer, scheduler=scheduler,
                                           scaler=scaler, device=device)
    record = RunRecord(run_dir, config=to_dict(cfg), start_iter=start_iter, resumed=seen is not None, seen=seen,
                       files={"subset_image_ids.json": train_set.image_ids()} if cfg.data.subset else None)
    meta = {"class_names": train_set.class_names, "label_to_cat_id": train_set.label_to_cat_id,
            "num_keypoints": getattr(train_set, "num_keypoints", None)}
    evaluate = build_evaluator(cfg, model, train_set, val_paths, record=record, run_dir=run_dir, device=device,
                               dtype=dtype, max_iter=sched.max_iter, progress=progress)
    train_model = across_ranks(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = build_gradient_clipper(cfg.solver.clip_gradients, value=cfg.solver.clip_value,
                                  norm_type=cfg.solver.clip_norm_type)

    def save(name: str, iteration: int) -> None:
        check_nonfinite(window, iteration, limit=cfg.solver.skip_nonfinite, scheduler=scheduler, run_dir=run_dir)
        record.checkpoint(name, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                          iteration=iteration, meta=meta, window=window, keep=cfg.solver.keep_checkpoints)

    # ---- the loop -------------------------------------------------------------------------------
    with StopSignal() as stop:  # before the loader: a signal while it starts still checkpoints
        sampler = TrainSampler(train_set.aspect_ratios(), batch_size=cfg.solver.ims_per_batch, seed=cfg.train.seed,
                               start=start_iter, rank=rank, world_size=world,
                               group_by_aspect=cfg.dataloader.aspect_ratio_grouping, sizes=batch_sizes(cfg.data))
        loader = iter(train_loader(train_set, sampler, num_workers=cfg.dataloader.num_workers, seed=cfg.train.seed,
                                   pin_memory=device.type == "cuda"))
        model.train()
        bar = tqdm(total=sched.max_iter, initial=start_iter, desc="train", file=sys.stderr, dynamic_ncols=True,
                   disable=not progress or not dist.is_main())
        timer, last_eval = Throughput(device=device), {}
        try:
            for iteration in range(start_iter, sched.max_iter):
                images, targets = next(loader)
                record.count(images, targets)
                lr = optimizer.param_groups[0]["lr"]
                names, losses, bad = train_step(train_model, images, targets, optimizer=optimizer, scaler=scaler,
                                                params=params, dtype=dtype, device=device,
                                                names=window.names if window else None, clip=clip)
                scheduler.step()
                window = window or LossWindow(names, device)
                window.add(losses, bad, iteration)
                timer.step()
                done = iteration + 1
                if done % cfg.train.log_period == 0 or done == sched.max_iter:
                    line = log_line(window, timer, iteration=done, lr=lr, ims_per_batch=cfg.solver.ims_per_batch,
                                    seen={**record.reduce_seen(), **pretrain_seen}, bar=bar)
                    check_nonfinite(window, iteration, limit=cfg.solver.skip_nonfinite, scheduler=scheduler,
                                    run_dir=run_dir)
                    record.write(line)
                bar.update(1)
                evaluating = evaluate is not None and cfg.test.eval_period and done % cfg.test.eval_period == 0
                checkpointing = done % cfg.solver.checkpoint_period == 0
                if (evaluating or checkpointing) and done < sched.max_iter:
                    with timer.paused():
                        last_eval = evaluate(done) if evaluating else last_eval
                        if checkpointing:
                            save(f"model_{done:07d}.pth", done)
                if done in keep_at and done < sched.max_iter:  # a name checkpoint pruning never matches
                    save(branch_name(done), done)
                if stop.received() and done < sched.max_iter:  # every rank stops after the same iteration
                    save(f"model_{done:07d}.pth", done)
                    dist.barrier()  # the checkpoint is complete before any rank exits
                    raise Preempted(f"received signal {stop.signum or 'on another rank'}: checkpoint written at "
                                    f"iteration {done}; continue with: scratchdet train --resume {run_dir}")
            bar.close()
            if window is not None and needs_end_line(run_dir, start_iter=start_iter, max_iter=sched.max_iter,
                                                     log_period=cfg.train.log_period):
                means, steps = window.read()
                if steps:  # the trunk's steps since its last line
                    record.write({"iteration": sched.max_iter, **means, "lr": optimizer.param_groups[0]["lr"],
                                  **record.reduce_seen(), **pretrain_seen})
            # ---- the end: final weights, final evaluation ------------------------------------------
            save(ckpt.FINAL, sched.max_iter)
            if evaluate is not None:
                last_eval = evaluate(sched.max_iter)
        finally:
            bar.close()
            record.close()
    final = {**summary, **record.seen, **pretrain_seen, **last_eval}
    record.finish(final)
    return final


def build_evaluator(cfg: Config, model: torch.nn.Module, train_set: CocoDetection, val_paths: tuple[str, str] | None,
                    *, record: RunRecord, run_dir: Path, device: torch.device, dtype: torch.dtype | None,
                    max_iter: int, progress: bool) -> Callable[[int], dict[str, Any]] | None:
    """What the loop calls to evaluate at an iteration (None without a validation set): AP on this rank's shard
    (``evaluation.evaluate_run``), written to ``metrics.jsonl`` and logged; at the end, the per-image matches."""
    # Imported here: what imports train_step alone (benchmarks on a GPU image without faster-coco-eval) needs none of it.
    from .evaluation import ap_line, build_eval, evaluate_run

    loader, gt = build_eval(cfg, val_paths, rank=dist.rank(), world_size=dist.world_size(),
                            class_names=train_set.class_names)
    voc = cfg.data.val.format == "voc"
    if val_paths is not None and not voc:  # results are written with the training label map's category ids
        check_categories(train_set.label_to_cat_id, val_paths[1], what="validation set")
    if loader is None:
        return None

    def evaluate(iteration: int) -> dict[str, Any]:
        # The final evaluation's per-image matches go into the run's one record: a report bootstraps AP from them.
        metrics, tables, matches = evaluate_run(
            model, loader, gt, device=device, dtype=dtype, out_dir=run_dir, task=cfg.model.task, voc=voc,
            label_to_cat_id=train_set.label_to_cat_id, iteration=iteration, matches=iteration == max_iter,
            progress=progress)
        # VOC: the means go into metrics.jsonl, the per-class APs (too many for each line) into the log.
        result = {"iteration": iteration, **({k: metrics[k] for k in VOC_MEANS} if voc else metrics)}
        record.write(result)
        if tables is not None and dist.is_main():
            log.info("iteration %d, VOC AP per class:\n%s", iteration, tables)
        log.info("iteration %d: %s", iteration, ap_line(result))
        if matches is not None:
            record.write({"iteration": iteration, "matches": matches})
        return result

    return evaluate


def across_ranks(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model as the step runs it: under torchrun (one process per device), DDP, which averages the
    gradients during the backward pass; alone, the model itself."""
    if dist.world_size() == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)


def build_solver(cfg: Config, model: torch.nn.Module, sched: Schedule, dtype: torch.dtype | None,
                 device: torch.device) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    """SGD (norm and bias weight decay apart), the warmup-and-steps LR schedule, the fp16 scaler (off otherwise)."""
    s = cfg.solver
    optimizer = build_optimizer(model, base_lr=sched.base_lr, momentum=s.momentum, weight_decay=s.weight_decay,
                                weight_decay_norm=s.weight_decay_norm, weight_decay_bias=s.weight_decay_bias)
    scheduler = build_lr_scheduler(optimizer, steps=sched.steps, gamma=s.gamma, warmup_iters=sched.warmup_iters,
                                   warmup_factor=s.warmup_factor)
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def resume_from(run_dir: Path, resume: bool, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any, scaler: Any, device: torch.device) -> tuple[int, dict[str, int] | None, LossWindow | None]:
    """With ``resume``, restore the newest valid checkpoint; returns the iteration to start at, what was
    seen (None: a fresh run) and the loss window (None: it starts at the first step, with the loss names)."""
    found = latest_checkpoint(run_dir) if resume else None
    if found is None:
        if resume:
            log.info("--resume: no checkpoint in %s yet, starting from scratch", run_dir)
        return 0, None, None
    path, state = found
    restore_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    log.info("resumed from %s at iteration %d", path.name, int(state["iteration"]))
    window = LossWindow.from_state(state["window"], device) if state.get("window") else None
    return int(state["iteration"]), state["seen"], window


def describe_run(cfg: Config, model: torch.nn.Module, sched: Any, dtype: torch.dtype | None,
                 train_set: CocoDetection | None, device: torch.device) -> dict[str, Any]:
    """Log what will run (schedule notes, model, precision) and return it as the run's summary."""
    for note in (*cfg.load_notes, *sched.notes):
        log.info("%s", note)
    warning = short_schedule_warning(cfg.model.init, sched.max_iter * cfg.solver.ims_per_batch)
    if warning and dist.is_main():  # one warning per run, not one per rank
        log.warning("%s", warning)
    n_params, n_trainable = count_parameters(model)
    name = {"masks": "Mask R-CNN", "boxes": "Faster R-CNN", "keypoints": "Keypoint R-CNN"}[cfg.model.task]
    log.info("model: %s%s %s%d-FPN, norm %s, %s parameters (%s trainable), init %s",
             "Cascade " if cfg.model.roi_head == "cascade" else "", name, "X" if cfg.model.groups > 1 else "R",
             cfg.model.depth, cfg.model.norm, f"{n_params:,}", f"{n_trainable:,}", cfg.model.init)
    log.info("precision: %s%s [%s]", precision_name(dtype),
             ", channels-last" if next(model.parameters()).is_contiguous(memory_format=torch.channels_last) else "",
             precision_reason(cfg.train.amp, device))
    log.info("schedule: %d iterations of %d images%s, base LR %g, LR drops at %s, warmup %d iterations",
             sched.max_iter, cfg.solver.ims_per_batch,
             f" ({cfg.solver.ims_per_batch // dist.world_size()} on each of {dist.world_size()} processes)"
             if dist.world_size() > 1 else "", sched.base_lr, list(sched.steps), sched.warmup_iters)
    s = cfg.solver
    clipping = describe_clipping(s.clip_gradients, value=s.clip_value, norm_type=s.clip_norm_type)
    if clipping:
        log.info("%s", clipping)
    describe_input(cfg, train_set)
    return {"parameters": n_params, "trainable_parameters": n_trainable, "max_iter": sched.max_iter,
            "base_lr": sched.base_lr, "steps": list(sched.steps), "warmup_iters": sched.warmup_iters,
            "ims_per_batch": cfg.solver.ims_per_batch, "world_size": dist.world_size(),
            "train_images": len(train_set) if train_set else None,
            "num_classes": model.roi_heads.box_predictor[-1].cls_score.out_features - 1 if cfg.model.roi_head == "cascade"
            else model.roi_heads.box_predictor.cls_score.out_features - 1, "precision": precision_name(dtype),
            "norm_layers": sorted({type(m).__name__ for _, m in norm_layers(model)})}


def describe_input(cfg: Config, train_set: CocoDetection | None) -> None:
    """Log the input size and the anchors, and warn where the training set's images or boxes (its annotations'
    sizes, at that input size) are far from them (``data.input_size_report``)."""
    from .data import input_size_report

    d, m = cfg.data, cfg.model
    if d.lsj:
        train_in = (f"large-scale jitter, fitted into a {d.lsj_size} px square x {d.lsj_scale[0]:g}-{d.lsj_scale[-1]:g} "
                    f"then cropped or padded to {d.lsj_size}x{d.lsj_size} (data.lsj_size, data.lsj_scale)")
    else:
        sizes = sorted(d.min_size_train)
        train_in = (f"shorter side {sizes[0]}" if len(sizes) == 1 else
                    f"shorter side drawn per {d.multiscale} from {len(sizes)} sizes {sizes[0]}-{sizes[-1]} "
                    "(multi-scale, data.multiscale)")
        train_in += f", longer side at most {d.max_size_train} (data.min_size_train, data.max_size_train)"
        if d.multiscale == "batch" and len(sizes) == 1:
            log.info("note: data.multiscale=batch with one data.min_size_train: there is no size to draw")
    test_in = f"shorter side {d.min_size_test}, longer at most {d.max_size_test} (data.min_size_test, data.max_size_test)"
    if cfg.test.aug:
        test_in += f"; test-time augmentation at {list(cfg.test.aug_min_sizes)}, longer at most {cfg.test.aug_max_size}"
    log.info("input size: training %s, flip %g; test %s", train_in, d.flip_prob, test_in)
    log.info("anchors: %s px on P2-P6, aspect ratios %s (model.anchor_sizes, model.anchor_aspect_ratios)",
             list(m.anchor_sizes), list(m.anchor_aspect_ratios))
    if train_set is None:
        return
    summary, warnings = input_size_report(train_set, min_sizes=d.min_size_train, max_size=d.max_size_train,
                                          anchor_sizes=m.anchor_sizes, lsj_size=d.lsj_size if d.lsj else 0,
                                          lsj_scale=d.lsj_scale, aspect_ratios=m.anchor_aspect_ratios)
    if summary:
        log.info("%s", summary)
    for warning in warnings if dist.is_main() else ():  # one warning per run, not one per rank
        log.warning("%s", warning)
