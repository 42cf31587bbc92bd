"""The training loop, top to bottom in one function (``train``).

Read ``train`` from the top: set up the run, build data, model and solver, resume if asked,
then iterate: load a batch, compute the losses, stop on a non-finite one, step, log, evaluate,
checkpoint.  The run directory, the metrics writer and checkpoints live in ``run``;
``metrics.jsonl`` is the run's one record, and everything else (reports, comparisons) reads it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed as dist
from .config import (
    Config,
    ConfigError,
    branch_point,
    check_schedule,
    resolve_schedule,
    short_schedule_warning,
    to_dict,
)
from .data import (
    CocoDetection,
    TrainSampler,
    build_lsj_transforms,
    build_transforms,
    check_categories,
    draw_subset,
    resolve_datasets,
    test_loader,
    train_loader,
)
from .model import build_model, count_parameters, model_kwargs, norm_layers, sampling_seeds
from .run import (  # noqa: F401 - read_metrics and load_run_model are part of this module's public face
    LossWindow,
    NonFiniteLossError,
    Preempted,
    RunRecord,
    amp_dtype,
    branch_name,
    latest_checkpoint,
    load_run_model,
    on_main,
    pick_device,
    precision_name,
    precision_reason,
    prepare_on_main,
    read_metrics,
    restore_training_state,
    seed_everything,
    setup_logging,
    start_branch,
    sync_device,
    use_channels_last,
    use_deterministic,
)
from .solver import (
    GradientClipper,
    build_gradient_clipper,
    build_lr_scheduler,
    build_optimizer,
    describe_clipping,
    skip_nonfinite_step,
)
from .voc import VOC_MEANS, VOC_RESULTS, VOC_TABLES, evaluate_model_voc, load_voc, voc_present
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

    Our choice (issue 15): a dry run reads what the run reads, and a file it cannot read is an error there as in
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
    model = build_model(**model_kwargs(cfg.model, train_set.num_classes if train_set else None,
                                       getattr(train_set, "num_keypoints", None))).to(device)
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
    return train_set


def build_eval(cfg: Config, val: tuple[str, str] | None, *, rank: int = 0, world_size: int = 1,
               class_names: list[str] | None = None) -> tuple[Any, Any] | tuple[None, None]:
    """The validation loader (test-time resize, no flip; this rank's shard) and its ground truth: COCO's,
    or for ``data.val.format: voc`` the VocDetection itself (read with the training set's ``class_names``)."""
    if val is None:
        return None, None
    transforms = None if cfg.test.aug else build_transforms(
        train=False, min_sizes=[cfg.data.min_size_test], max_size=cfg.data.max_size_test, flip_prob=0)
    voc = cfg.data.val.format == "voc"
    dataset = load_voc(val[0], val[1], class_names=class_names, transforms=transforms) if voc else \
        CocoDetection(images=val[0], annotations=val[1], transforms=transforms, task=cfg.model.task)
    loader = test_loader(dataset, batch_size=cfg.test.ims_per_batch, num_workers=cfg.dataloader.num_workers,
                         max_images=cfg.test.max_images, rank=rank, world_size=world_size)
    if voc:
        gt = dataset
    else:
        from .evaluation import load_gt  # imported where evaluation is set up: see train's evaluate

        gt = load_gt(val[1])
    if cfg.test.aug:
        # Test-time augmentation resizes each original image itself; evaluation.run_inference predicts through it.
        from .tta import TestTimeAug, keypoint_flip_map

        loader.test_aug = TestTimeAug(min_sizes=cfg.test.aug_min_sizes, max_size=cfg.test.aug_max_size,
                                      flip=cfg.test.aug_flip,
                                      keypoint_flip=None if voc else keypoint_flip_map(gt.dataset["categories"]))
    return loader, gt


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
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    # One combined check on the device, agreed by all ranks: a non-finite loss or gradient skips the
    # step (torchvision's reference engine stops on a non-finite loss, reading it on the host every
    # iteration; with fp16 the GradScaler skips overflows by itself).  The host reads the count at
    # log lines and checkpoints.
    if scaler.is_enabled():
        bad = dist.all_reduce_((~torch.isfinite(total.detach())).int(), "max").bool()
        if clip is not None:  # on the true gradients: the scaler's factor divided out first
            scaler.unscale_(optimizer)
            clip([p.grad for p in params if p.grad is not None], None)
        scaler.step(optimizer)
        scaler.update()
    else:
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        bad = dist.all_reduce_((~torch.isfinite(total.detach() + grad_norm)).int(), "max").bool()
        if clip is not None:
            clip(grads, grad_norm)
        skip_nonfinite_step(optimizer, bad)
    return names, torch.cat([losses.detach(), total.detach()[None]]), bad


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, force: bool = False,
          dry_run: bool = False, progress: bool = True, stop_at: int | None = None,
          keep_at: tuple[int, ...] = (), branch_from: str | Path | None = None) -> dict[str, Any]:
    """Train (or, with ``dry_run``, describe) a run; returns the final metrics.

    Under ``torchrun`` every rank runs this function: each takes its slice of every global batch,
    DDP averages the gradients, and rank 0 alone writes the run directory.  Schedule branching
    (one trunk, many lengths): ``keep_at`` saves the trunk's state at those iterations
    (``branch_*.pth``); ``branch_from`` starts this run from such a trunk at its own first LR
    drop, where the two runs part (the same run at the same LR before it).
    """
    resume = resume or branch_from is not None
    run_dir = Path(run_dir)
    device = pick_device(cfg.train.device)
    if not dry_run:
        dist.init(device, timeout_s=cfg.train.dist_timeout)
        if dist.restarted():  # torchrun --max-restarts runs the same command line again: continue, never wipe
            log.warning("restart %s by torchrun: resuming %s", os.environ["TORCHELASTIC_RESTART_COUNT"], run_dir)
            resume, force = True, False
        prepare_on_main(run_dir, resume=resume, force=force)
    setup_logging(None if dry_run else run_dir)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed, use_deterministic(cfg.train.deterministic, device),
                    strict=cfg.train.deterministic == "on")
    # Precision is the only thing the hardware changes: the schedule, LR and data are the same in bf16 and fp32.
    dtype = amp_dtype(cfg.train.amp, device)
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
    late = [k for k in keep_at if k >= sched.max_iter]
    if late:  # a branch point the trunk never reaches (or its end, where model_final.pth is the state)
        raise ConfigError(f"--keep-at {', '.join(map(str, late))}: at or past this run's end ({sched.max_iter} "
                          "iterations); a trunk keeps the first LR drops of shorter lengths")
    if dry_run:
        return summary
    if branch_from is not None:
        on_main(start_branch, branch_from, run_dir, branch_point(sched), config=to_dict(cfg),
                num_images=len(train_set) if train_set else None, end=sched.max_iter)
    assert train_set is not None

    # ---- solver; resume: model, solver, RNG and the sampler's position ----------------------------
    optimizer = build_optimizer(model, base_lr=sched.base_lr, momentum=cfg.solver.momentum,
                                weight_decay=cfg.solver.weight_decay, weight_decay_norm=cfg.solver.weight_decay_norm,
                                weight_decay_bias=cfg.solver.weight_decay_bias)
    scheduler = build_lr_scheduler(optimizer, steps=sched.steps, gamma=cfg.solver.gamma,
                                   warmup_iters=sched.warmup_iters, warmup_factor=cfg.solver.warmup_factor)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    meta = {"class_names": train_set.class_names, "label_to_cat_id": train_set.label_to_cat_id,
            "num_keypoints": getattr(train_set, "num_keypoints", None)}
    start_iter, seen, window = 0, None, None  # the loss window starts at the first step (loss names)
    found = latest_checkpoint(run_dir) if resume else None
    if found is not None:
        path, state = found
        restore_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start_iter, seen = int(state["iteration"]), state["seen"]
        window = LossWindow.from_state(state["window"], device) if state.get("window") else None
        log.info("resumed from %s at iteration %d", path.name, start_iter)
    elif resume:
        log.info("--resume: no checkpoint in %s yet, starting from scratch", run_dir)
    record = RunRecord(run_dir, config=to_dict(cfg), start_iter=start_iter, resumed=found is not None, seen=seen,
                       files={"subset_image_ids.json": train_set.image_ids()} if cfg.data.subset else None)
    eval_loader, gt = build_eval(cfg, val_paths, rank=rank, world_size=world, class_names=train_set.class_names)
    voc_val = cfg.data.val.format == "voc"
    if val_paths is not None and not voc_val:  # results are written with the training label map's category ids
        check_categories(train_set.label_to_cat_id, val_paths[1], what="validation set")
    # One process per device under torchrun; DDP averages gradients during the backward pass.
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
    ) if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    clip = build_gradient_clipper(cfg.solver.clip_gradients, value=cfg.solver.clip_value,
                                  norm_type=cfg.solver.clip_norm_type)

    def evaluate(iteration: int) -> dict[str, Any]:
        """COCO AP on the validation set for the task's types (each rank its shard), logged by rank 0."""
        # The evaluation stack (faster-coco-eval's COCOeval) is imported here, not at the top: what
        # imports the training step (benchmarks/train_throughput.py on a GPU machine without
        # faster-coco-eval) does not need it.
        from .evaluation import TASK_IOU_TYPES, ap_line, evaluate_model

        dist.broadcast_buffers(model)  # every shard scored with the statistics the checkpoint holds
        with tqdm(total=len(eval_loader.dataset), desc="eval", leave=False, file=sys.stderr,
                  disable=not progress or not dist.is_main()) as bar:
            if voc_val:
                # VOC mAP@0.5, both metrics; the means go into metrics.jsonl, the per-class APs (20 or 80
                # of them, too many for each line) into voc_eval.txt and the log.
                scores, tables = evaluate_model_voc(model, eval_loader, gt=gt, device=device, amp_dtype=dtype,
                                                    results_path=run_dir / VOC_RESULTS, progress=bar)
                result = {"iteration": iteration, **{k: scores[k] for k in VOC_MEANS}}
                if dist.is_main():
                    (run_dir / VOC_TABLES).write_text(f"iteration {iteration}\n\n{tables}")
                    log.info("iteration %d, VOC AP per class:\n%s", iteration, tables)
            else:
                result = {"iteration": iteration, **evaluate_model(
                    model, eval_loader, gt=gt, device=device, label_to_cat_id=train_set.label_to_cat_id,
                    amp_dtype=dtype, results_path=run_dir / "coco_instances_results.json", progress=bar,
                    iou_types=TASK_IOU_TYPES[cfg.model.task])}
        record.write(result)
        log.info("iteration %d: %s", iteration, ap_line(result))
        if iteration == sched.max_iter and not voc_val and dist.is_main():
            # The final evaluation's per-image matches, in the run's one record: a report computes paired
            # bootstrap intervals of AP from them (scratchdet/bootstrap.py) without the data or results file.
            from .bootstrap import matches_record, per_image_matches

            results = run_dir / "coco_instances_results.json"
            record.write({"iteration": iteration, "matches": {
                t: matches_record(per_image_matches(gt, results, t)) for t in TASK_IOU_TYPES[cfg.model.task]}})
        return result

    def check_nonfinite(iteration: int) -> None:
        """Stop when more steps were skipped than solver.skip_nonfinite allows (reads the device)."""
        n, first, terms = window.nonfinite() if window is not None else (0, -1, [])
        if n > cfg.solver.skip_nonfinite:
            lr = sched.base_lr * scheduler.lr_lambdas[0](first)
            raise NonFiniteLossError(
                f"non-finite {', '.join(terms)} at iteration {first} (lr {lr:g}); {n} step(s) skipped by iteration "
                f"{iteration} (solver.skip_nonfinite={cfg.solver.skip_nonfinite}); the last good checkpoint is "
                f"kept in {run_dir}")

    def save(name: str, iteration: int) -> None:
        check_nonfinite(iteration)
        record.checkpoint(name, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                          iteration=iteration, meta=meta, window=window, keep=cfg.solver.keep_checkpoints)

    # SIGTERM/SIGINT (a cluster's preemption, a Ctrl-C): finish the iteration, checkpoint, exit.
    stop = {"signal": None}
    old_handlers = {s: signal.signal(s, lambda signum, _: stop.update(signal=signum))
                    for s in (signal.SIGTERM, signal.SIGINT)}

    # ---- the loop -------------------------------------------------------------------------------
    sampler = TrainSampler(train_set.aspect_ratios(), batch_size=cfg.solver.ims_per_batch, seed=cfg.train.seed,
                           start=start_iter, rank=rank, world_size=world,
                           group_by_aspect=cfg.dataloader.aspect_ratio_grouping)
    loader = iter(train_loader(train_set, sampler, num_workers=cfg.dataloader.num_workers, seed=cfg.train.seed,
                               pin_memory=device.type == "cuda"))
    model.train()
    bar = tqdm(total=sched.max_iter, initial=start_iter, desc="train", file=sys.stderr, dynamic_ncols=True,
               disable=not progress or not dist.is_main())
    # images/s counts training only: evaluation and checkpoint time inside a window is taken out.
    t_window, n_timed, t_other = time.perf_counter(), 0, 0.0
    last_eval: dict[str, Any] = {}
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
            n_timed += 1
            done = iteration + 1
            if done % cfg.train.log_period == 0 or done == sched.max_iter:
                means, steps = window.read()  # the host waits for the device here, once per log line
                check_nonfinite(iteration)
                elapsed = time.perf_counter() - t_window - t_other
                n, first, terms = window.nonfinite()
                line = {"iteration": done, **means, "lr": lr,
                        "images_per_sec": round(n_timed * cfg.solver.ims_per_batch / elapsed, 3),
                        "time_per_iter": round(elapsed / n_timed, 4), **record.reduce_seen(), **pretrain_seen}
                if n:
                    line.update(skipped_steps=n, skipped_step=f"{', '.join(terms)} at iteration {first}")
                record.write(line if steps else {k: v for k, v in line.items() if k not in means})
                if steps:
                    bar.set_postfix(loss=f"{line['loss']:.3f}", lr=f"{lr:.2g}", ips=f"{line['images_per_sec']:.1f}")
                t_window, n_timed, t_other = time.perf_counter(), 0, 0.0
            bar.update(1)
            evaluating = eval_loader is not None and cfg.test.eval_period and done % cfg.test.eval_period == 0 \
                and done < sched.max_iter
            checkpointing = done % cfg.solver.checkpoint_period == 0 and done < sched.max_iter
            if evaluating or checkpointing:
                sync_device(device)  # the steps queued before the pause are training time, counted as such
                t_pause = time.perf_counter()
                if evaluating:
                    last_eval = evaluate(done)
                if checkpointing:
                    save(f"model_{done:07d}.pth", done)
                sync_device(device)
                t_other += time.perf_counter() - t_pause
            # A schedule-branching trunk saves its branch points under a name prune() never matches;
            # stop_at ends a run there unfinished (a checkpoint, no final evaluation), as a kill would.
            if done in keep_at and done < sched.max_iter:
                save(branch_name(done), done)
            if stop_at is not None and done == stop_at and done < sched.max_iter:
                save(f"model_{done:07d}.pth", done)
                return {"stopped_at": done}
            # A signal on any rank stops all of them after the same iteration, with one checkpoint.
            if dist.any_rank(stop["signal"] is not None) and done < sched.max_iter:
                save(f"model_{done:07d}.pth", done)
                dist.barrier()  # the checkpoint is complete before any rank exits
                raise Preempted(f"received signal {stop['signal'] or 'on another rank'}: checkpoint written at "
                                f"iteration {done}; continue with: scratchdet train --resume {run_dir}")
        bar.close()
        if start_iter == sched.max_iter and window is not None and sched.max_iter % cfg.train.log_period \
                and not dist.broadcast(dist.is_main() and any(r.get("iteration") == sched.max_iter and "loss" in r
                                                              for r in read_metrics(run_dir))):
            # A branch whose branch point is its end (a schedule without LR drops) runs no step here;
            # its last log line (the trunk's steps since its last line) is the one a run alone writes
            # (once: a branch killed before model_final.pth kept it).
            means, steps = window.read()
            if steps:
                record.write({"iteration": sched.max_iter, **means, "lr": optimizer.param_groups[0]["lr"],
                              **record.reduce_seen(), **pretrain_seen})
        # ---- the end: final weights, final evaluation ------------------------------------------
        save(ckpt.FINAL, sched.max_iter)
        if eval_loader is not None:
            last_eval = evaluate(sched.max_iter)
    finally:
        bar.close()
        record.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    final = {**summary, **record.seen, **pretrain_seen, **last_eval}
    record.finish(final)
    return final


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
                    f"shorter side drawn from {len(sizes)} sizes {sizes[0]}-{sizes[-1]} (multi-scale)")
        train_in += f", longer side at most {d.max_size_train} (data.min_size_train, data.max_size_train)"
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
