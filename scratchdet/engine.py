"""The training loop, top to bottom in one function (``train``).

Read ``train`` from the top: set up the run, build data, model and solver, resume if asked,
then iterate: load a batch, compute the losses, stop on a non-finite one, step, log, evaluate,
checkpoint.  The run directory, the metrics writer and checkpoints live in ``run``;
``metrics.jsonl`` is the run's one record, and everything else (reports, comparisons) reads it.
"""

from __future__ import annotations

import json
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
from .config import Config, ConfigError, dump_yaml, resolve_schedule, short_schedule_warning, to_dict
from .data import (
    CocoDetection,
    TrainSampler,
    build_transforms,
    check_categories,
    draw_subset,
    resolve_datasets,
    test_loader,
    train_loader,
)
from .evaluation import evaluate_model, load_gt
from .model import build_model, count_parameters, model_kwargs, norm_layers, sampling_seeds
from .run import (  # noqa: F401 - read_metrics and load_run_model are part of this module's public face
    MetricsWriter,
    NonFiniteLossError,
    NullWriter,
    Preempted,
    amp_dtype,
    environment,
    load_run_model,
    pick_device,
    precision_name,
    prepare_run_dir,
    read_metrics,
    restore_training_state,
    save_training_state,
    seed_everything,
    setup_logging,
    use_deterministic,
)
from .solver import build_lr_scheduler, build_optimizer, skip_nonfinite_step
from .weights import imagenet_source, load_init

log = logging.getLogger("scratchdet")


def build_train_set(cfg: Config, train_paths: tuple[str, str]) -> CocoDetection:
    """The training set with its augmentation, cut to ``data.subset`` when set."""
    train_set = CocoDetection(images=train_paths[0], annotations=train_paths[1], filter_empty=cfg.data.filter_empty,
                              transforms=build_transforms(train=True, min_sizes=cfg.data.min_size_train,
                                                          max_size=cfg.data.max_size_train,
                                                          flip_prob=cfg.data.flip_prob))
    log.info("training data: %s (%d images, %d classes); %s", train_paths[1], len(train_set), train_set.num_classes,
             train_set.report.summary())
    if cfg.data.subset:
        # The paper's data-size study (Sec. 5.3): random subsets, nested for one seed (1k in 10k in 35k).
        ids = draw_subset(train_set.image_ids(), cfg.data.subset, cfg.data.subset_seed)
        train_set.keep(ids)
        log.info("data.subset=%g (seed %d): training on %d images", cfg.data.subset, cfg.data.subset_seed, len(ids))
    return train_set


def build_eval(cfg: Config, val: tuple[str, str] | None, *, rank: int = 0,
               world_size: int = 1) -> tuple[Any, Any] | tuple[None, None]:
    """The validation loader (test-time resize, no flip; this rank's shard) and its COCO ground truth."""
    if val is None:
        return None, None
    dataset = CocoDetection(images=val[0], annotations=val[1], transforms=build_transforms(
        train=False, min_sizes=[cfg.data.min_size_test], max_size=cfg.data.max_size_test, flip_prob=0))
    loader = test_loader(dataset, batch_size=cfg.test.ims_per_batch, num_workers=cfg.dataloader.num_workers,
                         max_images=cfg.test.max_images, rank=rank, world_size=world_size)
    return loader, load_gt(val[1])


class LossWindow:
    """Loss sums since the last log line, the count of skipped non-finite steps and the first of
    them, all kept on the device: nothing in the step waits for the host.  Read (and reduced over
    ranks) at log lines and checkpoints; checkpointed, so a resumed run logs the same numbers."""

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names, self.device = names, device
        self.sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)  # each loss, then their total
        self.steps = torch.zeros((), dtype=torch.int64, device=device)  # steps taken in this window
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # skipped steps, whole run
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first skipped iteration
        self.bad_terms = torch.zeros(len(names) + 1, dtype=torch.bool, device=device)  # ... and what was non-finite

    def add(self, losses: torch.Tensor, bad: torch.Tensor, iteration: int) -> None:
        """losses: [L + 1] (each loss and the total), bad: [] bool, both on the device."""
        self.sums += torch.where(bad, 0.0, losses.detach().double())
        self.steps += (~bad).long()
        self.skipped += bad.long()
        first = bad & (self.first_bad < 0)
        self.first_bad = torch.where(first, iteration, self.first_bad)
        self.bad_terms = torch.where(first, ~torch.isfinite(losses.detach()), self.bad_terms)

    def read(self) -> tuple[dict[str, float], int]:
        """The window's mean losses over steps and ranks (a host sync), and the steps they cover."""
        sums = dist.all_reduce_(self.sums.clone())
        steps = int(dist.all_reduce_(self.steps.clone()).item())
        means = {k: round(float(v) / max(steps, 1), 5) for k, v in zip(self.names + ["loss"], sums.tolist())}
        self.sums.zero_()
        self.steps.zero_()
        return means, steps

    def nonfinite(self) -> tuple[int, int, list[str]]:
        """(skipped steps so far, first skipped iteration, the losses non-finite there)."""
        terms = [n for n, b in zip(self.names, self.bad_terms.tolist()) if b]  # finite losses: the gradient was not
        return int(self.skipped.item()), int(self.first_bad.item()), terms or ["gradient norm"]

    def state(self) -> dict[str, Any]:
        """For a checkpoint (called on every rank): the partial sums of all ranks, gathered on rank 0
        (the others restart from 0), so the one file rank 0 writes holds the whole window."""
        dist.all_reduce_(self.sums)
        dist.all_reduce_(self.steps)
        if not dist.is_main():
            self.sums.zero_()
            self.steps.zero_()
        return {"names": self.names, **{k: getattr(self, k).cpu() for k in
                                        ("sums", "steps", "skipped", "first_bad", "bad_terms")}}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> LossWindow:
        window = cls(list(state["names"]), device)
        for k in ("skipped", "first_bad", "bad_terms") + (("sums", "steps") if dist.is_main() else ()):
            setattr(window, k, state[k].to(device))
        return window


def _prepare_on_main(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Rank 0 prepares the run directory; a refusal stops every rank with the same error."""
    error = None
    if dist.is_main():
        try:
            prepare_run_dir(run_dir, resume=resume, force=force)
        except FileExistsError as e:
            error = str(e)
    error = dist.broadcast(error)
    if error:
        raise FileExistsError(error)


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, force: bool = False,
          dry_run: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or, with ``dry_run``, describe) a run; returns the final metrics.

    Under ``torchrun`` every rank runs this function: each takes its slice of every global batch,
    gradients are averaged by DDP, and rank 0 alone writes the run directory.
    """
    run_dir = Path(run_dir)
    device = pick_device(cfg.train.device)
    if not dry_run:
        dist.init(device, timeout_s=cfg.train.dist_timeout)
        if dist.restarted() and not resume:
            # torchrun --max-restarts: the workers start again with the same command line.
            log.warning("restart %s by torchrun: resuming %s", os.environ["TORCHELASTIC_RESTART_COUNT"], run_dir)
            resume = True
        _prepare_on_main(run_dir, resume=resume, force=force)
    setup_logging(None if dry_run else run_dir)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed, use_deterministic(cfg.train.deterministic, device))
    dtype = amp_dtype(cfg.train.amp, device)
    rank, world = dist.rank(), dist.world_size()
    if cfg.solver.ims_per_batch % world:
        raise ConfigError(f"solver.ims_per_batch={cfg.solver.ims_per_batch} is the global batch and must divide "
                          f"among the {world} processes")

    # ---- data: training stream, validation set --------------------------------------------
    if not dry_run and world > 1 and dist.is_main():
        resolve_datasets(cfg.data)  # rank 0 generates the synthetic data (when used) while the others wait
    dist.barrier()
    train_paths, val_paths = resolve_datasets(cfg.data)
    train_set = None
    if dry_run and not Path(train_paths[1]).is_file():
        # A dry run describes a preset before its data is in place (COCO presets, say).
        log.info("training data: %s not found; the model is built for model.num_classes=%d",
                 train_paths[1], cfg.model.num_classes)
    else:
        train_set = build_train_set(cfg, train_paths)

    # ---- model, schedule ------------------------------------------------------------------------
    model = build_model(**model_kwargs(cfg.model, train_set.num_classes if train_set else None)).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    init_meta: dict[str, Any] = {}
    if dry_run and cfg.model.init == "imagenet":
        # Describe, do not download: a dry run must work offline.
        log.info("backbone would be initialized from %s", imagenet_source(cfg.model.depth, cfg.model.norm))
    elif cfg.model.init != "random":
        init_meta = load_init(model, cfg.model.init, depth=cfg.model.depth, norm=cfg.model.norm)
    # What the pre-training stage saw, carried into every log line (the paper's "images seen" comparisons).
    pretrain_seen = {f"pretrain_{k}": v for k, v in init_meta.get("seen", {}).items()}
    if cfg.model.norm == "SyncBN" and world == 1:
        log.info("model.norm=SyncBN in a single process: batch statistics come from this process's batch only "
                 "(plain BN); launch with torchrun for statistics across processes")
    sched = resolve_schedule(cfg.solver, len(train_set) if train_set else None)
    summary = describe_run(cfg, model, sched, dtype, train_set)
    if dry_run:
        return summary
    assert train_set is not None

    # ---- solver; resume: model, solver, RNG and the sampler's position ----------------------------
    optimizer = build_optimizer(model, base_lr=sched.base_lr, momentum=cfg.solver.momentum,
                                weight_decay=cfg.solver.weight_decay, weight_decay_norm=cfg.solver.weight_decay_norm,
                                weight_decay_bias=cfg.solver.weight_decay_bias)
    scheduler = build_lr_scheduler(optimizer, steps=sched.steps, gamma=cfg.solver.gamma,
                                   warmup_iters=sched.warmup_iters, warmup_factor=cfg.solver.warmup_factor)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    meta = {"class_names": train_set.class_names, "label_to_cat_id": train_set.label_to_cat_id}
    start_iter, seen = 0, {"images_seen": 0, "instances_seen": 0, "pixels_seen": 0}
    window: LossWindow | None = None  # created at the first step, when the loss names are known
    found = dist.broadcast(ckpt.latest_valid(run_dir) if resume and dist.is_main() else None)
    if found is not None:  # every rank loads the checkpoint rank 0 chose (the run directory is shared)
        path = found[0]
        state = found[1] if dist.is_main() else ckpt.load_checkpoint(path)
        restore_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start_iter, seen = int(state["iteration"]), dict(state["seen"])
        window = LossWindow.from_state(state["window"], device) if state.get("window") else None
        log.info("resumed from %s at iteration %d", path.name, start_iter)
    elif resume:
        log.info("--resume: no checkpoint in %s yet, starting from scratch", run_dir)
    if dist.is_main():
        dump_yaml(cfg, run_dir / "config.yaml")
        if cfg.data.subset:
            (run_dir / "subset_image_ids.json").write_text(json.dumps(train_set.image_ids()))
        (run_dir / "env.json").write_text(json.dumps(environment(), indent=1))
    metrics = MetricsWriter(run_dir, keep_until=start_iter if found else None) if dist.is_main() else NullWriter()
    if val_paths is not None:  # results are written with the training label map's category ids
        check_categories(train_set.label_to_cat_id, val_paths[1], what="validation set")
    eval_loader, gt = build_eval(cfg, val_paths, rank=rank, world_size=world)
    if world > 1:
        # One process per device; gradients averaged over ranks in the backward pass.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    else:
        train_model = model
    params = [p for p in model.parameters() if p.requires_grad]

    def evaluate(iteration: int) -> dict[str, Any]:
        bar = tqdm(total=len(eval_loader.dataset), desc="eval", leave=False, file=sys.stderr,
                   disable=not progress or not dist.is_main())
        with bar:
            result = evaluate_model(model, eval_loader, gt=gt, device=device, label_to_cat_id=train_set.label_to_cat_id,
                                    amp_dtype=dtype, results_path=run_dir / "coco_instances_results.json",
                                    progress=bar)
        record = {"iteration": iteration, **result}
        metrics.write(record)
        log.info("iteration %d: bbox/AP %.2f  segm/AP %.2f", iteration, result["bbox/AP"], result["segm/AP"])
        return record

    pending = [0, 0, 0]  # images, instances, pixels of this rank since the last reduction

    def count_seen() -> None:
        """Add every rank's images/instances/pixels since the last call (they describe the global batch)."""
        for key, n in zip(seen, dist.sum_ints(pending)):
            seen[key] += n
        pending[:] = [0, 0, 0]

    def check_nonfinite(iteration: int) -> None:
        """Stop when more steps were skipped than solver.skip_nonfinite allows (a host sync)."""
        if window is None:
            return
        n, first, terms = window.nonfinite()
        if n > cfg.solver.skip_nonfinite:
            lr = sched.base_lr * scheduler.lr_lambdas[0](first)
            raise NonFiniteLossError(
                f"non-finite {', '.join(terms)} at iteration {first} (lr {lr:g}); {n} step(s) skipped by iteration "
                f"{iteration} (solver.skip_nonfinite={cfg.solver.skip_nonfinite}); the last good checkpoint is "
                f"kept in {run_dir}")

    def save(name: str, iteration: int) -> None:
        count_seen()
        check_nonfinite(iteration)
        window_state = window.state() if window else None  # a collective: every rank
        if dist.is_main():
            save_training_state(run_dir / name, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                iteration=iteration, meta=meta, config=to_dict(cfg),
                                progress={"seen": seen, "window": window_state})

    # SIGTERM/SIGINT (a cluster's preemption, a Ctrl-C): finish the iteration, checkpoint, exit.
    stop = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

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
            pending[0] += len(images)
            pending[1] += sum(len(t["labels"]) for t in targets)
            pending[2] += sum(im.shape[-1] * im.shape[-2] for im in images)
            seeds = [t["seed"] for t in targets]
            images = [im.to(device, non_blocking=True).float() for im in images]
            targets = [{k: t[k].to(device, non_blocking=True) for k in ("boxes", "labels", "masks")} for t in targets]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), sampling_seeds(seeds):
                loss_dict = train_model(images, targets)
            if window is None:
                window = LossWindow(list(loss_dict), device)
            losses = torch.stack([loss_dict[k] for k in window.names])
            total = losses.sum()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            # One combined check on the device, agreed by all ranks: a non-finite loss or gradient
            # skips the step (torchvision's reference engine stops on a non-finite loss; the
            # GradScaler skips fp16 overflows by itself).  The host reads the count at log lines.
            if dtype == torch.float16:
                bad = ~torch.isfinite(total.detach())
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
                    [p.grad for p in params if p.grad is not None])))
                bad = ~torch.isfinite(total.detach() + grad_norm)
            bad = dist.all_reduce_(bad.to(torch.int32), "max").bool()
            if scaler.is_enabled():
                scaler.step(optimizer)
                scaler.update()
            else:
                skip_nonfinite_step(optimizer, bad)
            scheduler.step()
            window.add(torch.cat([losses, total[None]]), bad, iteration)
            n_timed += 1
            done = iteration + 1
            if done % cfg.train.log_period == 0 or done == sched.max_iter:
                means, steps = window.read()  # the one host sync of a log window
                count_seen()
                check_nonfinite(iteration)
                elapsed = time.perf_counter() - t_window - t_other
                n, first, terms = window.nonfinite()
                record = {"iteration": done, **(means if steps else {}), "lr": lr,
                          "images_per_sec": round(n_timed * cfg.solver.ims_per_batch / elapsed, 3),
                          "time_per_iter": round(elapsed / n_timed, 4), **seen, **pretrain_seen}
                if n:
                    record.update(skipped_steps=n, skipped_step=f"{', '.join(terms)} at iteration {first}")
                metrics.write(record)
                if steps:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2g}", ips=f"{record['images_per_sec']:.1f}")
                t_window, n_timed, t_other = time.perf_counter(), 0, 0.0
            bar.update(1)
            t_pause = time.perf_counter()
            if eval_loader is not None and cfg.test.eval_period and done % cfg.test.eval_period == 0 \
                    and done < sched.max_iter:
                last_eval = evaluate(done)
            if done % cfg.solver.checkpoint_period == 0 and done < sched.max_iter:
                save(f"model_{done:07d}.pth", done)
                if dist.is_main():
                    ckpt.prune(run_dir, cfg.solver.keep_checkpoints)
            t_other += time.perf_counter() - t_pause
            # A signal on any rank stops all of them after the same iteration, with one checkpoint.
            if dist.any_rank(stop["signal"] is not None) and done < sched.max_iter:
                save(f"model_{done:07d}.pth", done)
                dist.barrier()
                raise Preempted(f"received signal {stop['signal'] or 'on another rank'}: checkpoint written at "
                                f"iteration {done}; continue with: scratchdet train --resume {run_dir}")
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
    final = {**summary, **seen, **pretrain_seen, **last_eval}
    if dist.is_main():
        (run_dir / "final.json").write_text(json.dumps(final, indent=1))
    return final


def describe_run(cfg: Config, model: torch.nn.Module, sched: Any, dtype: torch.dtype | None,
                 train_set: CocoDetection | None) -> dict[str, Any]:
    """Log what will run (schedule notes, model, precision) and return it as the run's summary."""
    for note in sched.notes:
        log.info("%s", note)
    warning = short_schedule_warning(cfg.model.init, sched.max_iter * cfg.solver.ims_per_batch)
    if warning and dist.is_main():  # one warning per run, not one per rank
        log.warning("%s", warning)
    n_params, n_trainable = count_parameters(model)
    log.info("model: Mask R-CNN R%d-FPN, norm %s, %s parameters (%s trainable), init %s", cfg.model.depth,
             cfg.model.norm, f"{n_params:,}", f"{n_trainable:,}", cfg.model.init)
    log.info("precision: %s%s", precision_name(dtype), ", channels-last" if cfg.train.channels_last else "")
    log.info("schedule: %d iterations of %d images%s, base LR %g, LR drops at %s, warmup %d iterations",
             sched.max_iter, cfg.solver.ims_per_batch,
             f" ({cfg.solver.ims_per_batch // dist.world_size()} on each of {dist.world_size()} processes)"
             if dist.world_size() > 1 else "", sched.base_lr, list(sched.steps), sched.warmup_iters)
    return {"parameters": n_params, "trainable_parameters": n_trainable, "max_iter": sched.max_iter,
            "base_lr": sched.base_lr, "steps": list(sched.steps), "warmup_iters": sched.warmup_iters,
            "ims_per_batch": cfg.solver.ims_per_batch, "world_size": dist.world_size(),
            "train_images": len(train_set) if train_set else None,
            "num_classes": model.roi_heads.box_predictor.cls_score.out_features - 1, "precision": precision_name(dtype),
            "norm_layers": sorted({type(m).__name__ for _, m in norm_layers(model)})}
