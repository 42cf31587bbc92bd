"""A run's directory and its record: logging, the metrics writer, training-state checkpoints,
exact resume, and loading a finished run's model.

The training loop (``engine.train``) calls these; ``predict``, ``pretrain``, ``eval`` and the
reports use them too, so what a run directory holds is defined here, in one place.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed as dist
from .device import cpu_bf16_support, pick_device, use_channels_last

log = logging.getLogger("scratchdet")

# Everything a run writes into its directory; `--force` removes exactly these (a user's own
# files in the folder are left alone), so nothing of the old run survives beside the new one.
RUN_OUTPUTS = ("config.yaml", "env.json", "metrics.jsonl", "log.txt", "final.json", "coco_instances_results.json",
               "subset_image_ids.json", "tensorboard", "inference", "backbone_final.pth", "backbone_final.pth.sha256",
               "voc_detections.json", "voc_eval.txt")  # the last two: voc.VOC_RESULTS, voc.VOC_TABLES


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN or Inf; the message names it, the iteration and the LR."""


class Preempted(SystemExit):
    """SIGTERM/SIGINT arrived; a checkpoint was written at the end of the iteration."""


# --------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """Versions, hardware and the command line, written to ``env.json``."""
    import torchvision

    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": cuda and torch.cuda.get_device_name(),
            **dict(zip(("cpu_bf16", "cpu_bf16_flags"), cpu_bf16_support())), "world_size": dist.world_size(),
            "argv": sys.argv}


def setup_logging(run_dir: Path | None = None) -> None:
    """Log to stdout, and to ``run_dir/log.txt`` on the main process; other ranks log warnings
    and errors only, prefixed with their rank."""
    log.setLevel(logging.INFO)
    rank = dist.rank()
    prefix = f"[rank {rank}] " if dist.world_size() > 1 else ""
    fmt = logging.Formatter(f"[%(asctime)s %(name)s] {prefix}%(message)s", "%H:%M:%S")
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler) or getattr(h, "_scratchdet", False):
            log.removeHandler(h)
            h.close()
    h = logging.StreamHandler(sys.stdout)
    h._scratchdet = True  # type: ignore[attr-defined]
    h.setFormatter(fmt)
    h.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.addHandler(h)
    if run_dir is not None and rank == 0:
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(fmt)
        log.addHandler(fh)


# --------------------------------------------------------------------------- the run directory


def prepare_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse to overwrite a finished (or started) run unless ``--force``/``--resume`` say so;
    with ``--force``, remove every output of the old run (``RUN_OUTPUTS`` and checkpoints)."""
    # A run that failed at its start (no checkpoint, no finished iteration logged) has nothing to protect.
    metrics = run_dir / "metrics.jsonl"
    logged = metrics.is_file() and any("iteration" in r for r in _parse_lines(metrics))
    started = (run_dir / ckpt.FINAL).exists() or logged or bool(ckpt.periodic_checkpoints(run_dir))
    if resume and (run_dir / ckpt.FINAL).exists() and not force:
        raise FileExistsError(f"{run_dir} holds a finished run ({ckpt.FINAL}); use --force to train it again")
    if run_dir.exists() and started and (force or not resume):
        if not force:
            raise FileExistsError(f"{run_dir} already holds a run; use --resume to continue it or --force to "
                                  "overwrite it")
        for p in list(run_dir.glob("model_*.pth*")) + [run_dir / name for name in RUN_OUTPUTS]:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def _parse_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; an unparsable *last* line (a write cut by SIGKILL) is
    dropped with a warning, an unparsable line elsewhere is an error naming the line."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                log.warning("%s: dropping an incomplete last line (a write cut short, e.g. by SIGKILL): %.60s",
                            path, line)
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e})") from None
    return records


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: Path, *, keep_until: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if keep_until is not None and self.path.exists():
            # Resuming from iteration N: what was logged after N is recomputed, so drop it.
            kept = [r for r in _parse_lines(self.path) if r.get("iteration", 0) <= keep_until]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        else:
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
                if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["iteration"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class NullWriter:
    """What ranks other than 0 write: nothing (one writer per run)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (its one record), oldest first."""
    path = Path(run_dir) / "metrics.jsonl"
    return _parse_lines(path) if path.exists() else []


# --------------------------------------------------------------------------- training state


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


def device_rng_state(device: torch.device) -> torch.Tensor | None:
    """This process's GPU RNG state (None off CUDA, or before CUDA has started)."""
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return None
    return torch.cuda.get_rng_state(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def save_training_state(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        scaler: Any, iteration: int, progress: dict[str, Any], meta: dict[str, Any],
                        config: dict[str, Any], device_rng: list[torch.Tensor | None] | None = None) -> None:
    """Everything exact resume needs: weights, solver, AMP scaler, RNG states, the sampler's
    position (the iteration) and the loop's counters (``progress``).  ``device_rng``: each rank's
    own GPU RNG state, in rank order (default: this process's), never every visible GPU's, so
    a run resumes on fewer GPUs than it was saved on."""
    rng = {k: v for k, v in ckpt.rng_state().items() if k != "cuda"}
    rng["cuda_by_rank"] = device_rng if device_rng is not None else [device_rng_state(_model_device(model))]
    ckpt.save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "iteration": iteration, "rng": rng, "meta": meta,
        "config": config, **progress})


def restore_training_state(state: dict[str, Any], *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: Any, scaler: Any) -> None:
    """Load what ``save_training_state`` wrote; this rank's GPU RNG state is its own rank's."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # The LR comes from this run's own schedule, not the saved one: a schedule branch resumes a
    # trunk's checkpoint whose optimizer holds the trunk's LR (identical on a plain resume).
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    scaler.load_state_dict(state["scaler"])
    rng = dict(state["rng"])
    # Older checkpoints hold one state per GPU visible when saving (get_rng_state_all), which
    # set_rng_state_all cannot restore on fewer GPUs: take this process's device's entry.
    per_gpu, by_rank = rng.pop("cuda", None), rng.pop("cuda_by_rank", None)
    ckpt.set_rng_state(rng)
    device = _model_device(model)
    if device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    own = by_rank[dist.rank()] if by_rank is not None and dist.rank() < len(by_rank) else \
        per_gpu[index] if per_gpu is not None and index < len(per_gpu) else None
    if own is not None:  # a rank the saving run did not have keeps its freshly seeded state
        torch.cuda.set_rng_state(own, device)


def load_run_model(run_dir: str | Path, checkpoint: str | Path | None = None, device: torch.device | None = None,
                   overrides: list[str] | tuple[str, ...] = ()) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """A trained run's model (``model_final.pth`` or the newest valid checkpoint), its config with
    ``overrides`` applied, and meta; built with the run's memory format, in eval mode."""
    from .config import from_dict, parse_override, set_key, validate
    from .model import build_model

    run_dir = Path(run_dir)
    if checkpoint is None:
        if (run_dir / ckpt.FINAL).exists():
            path, state = run_dir / ckpt.FINAL, ckpt.load_checkpoint(run_dir / ckpt.FINAL)
        else:
            found = ckpt.latest_valid(run_dir)
            if found is None:
                raise FileNotFoundError(f"{run_dir}: no {ckpt.FINAL} and no valid periodic checkpoint")
            path, state = found
            # Said, never silent: predictions from an unfinished run are not the run's result.
            log.warning("%s has no %s (unfinished run): using %s, iteration %s", run_dir, ckpt.FINAL, path.name,
                        state.get("iteration"))
    else:
        path, state = Path(checkpoint), ckpt.load_checkpoint(checkpoint)
    log.info("model: %s (iteration %s)", path, state.get("iteration"))
    cfg = from_dict(state["config"])
    for text in overrides:
        set_key(cfg, *parse_override(text))
    validate(cfg)
    meta = state["meta"]
    model = build_model(cfg.model, num_classes=len(meta["class_names"]), num_keypoints=meta.get("num_keypoints"))
    model.load_state_dict(state["model"])
    device = device or pick_device(cfg.train.device)
    model.to(device).eval()
    if use_channels_last(cfg.train.channels_last, device):  # as the run evaluated itself: the same kernels
        model.to(memory_format=torch.channels_last)
    return model, cfg, meta


def on_main(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Run ``fn`` on rank 0 only; its refusal (FileExistsError, FileNotFoundError) stops every rank."""
    error = None
    if dist.is_main():
        try:
            fn(*args, **kwargs)
        except (FileExistsError, FileNotFoundError) as e:
            error = (type(e).__name__, str(e))
    error = dist.broadcast(error)
    if error:
        raise (FileExistsError if error[0] == "FileExistsError" else FileNotFoundError)(error[1])


def prepare_on_main(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Rank 0 prepares the run directory; a refusal stops every rank with the same error."""
    on_main(prepare_run_dir, run_dir, resume=resume, force=force)


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid checkpoint, as rank 0 finds it; every rank loads that one file (resume
    under torchrun needs the run directory on a filesystem all nodes share)."""
    found = ckpt.latest_valid(run_dir) if dist.is_main() else None
    path = dist.broadcast(found[0] if found else None)  # the path only: each rank reads the file itself
    if path is None or dist.is_main():
        return found
    if not path.is_file():
        raise FileNotFoundError(f"rank {dist.rank()}: {path} not found; resuming under torchrun needs the run "
                                "directory on a filesystem every node shares")
    return path, ckpt.load_checkpoint(path)


class RunRecord:
    """What a training run writes into its directory (rank 0 only): config.yaml, env.json,
    metrics.jsonl with TensorBoard, checkpoints, final.json; and the images/instances/pixels
    seen, counted on each rank and summed over ranks when read (they describe the global batch)."""

    def __init__(self, run_dir: Path, *, config: dict[str, Any], start_iter: int, resumed: bool,
                 seen: dict[str, int] | None = None, files: dict[str, Any] | None = None,
                 counts: tuple[str, ...] = ("images_seen", "instances_seen", "pixels_seen")) -> None:
        self.run_dir, self.config = run_dir, config
        self.seen = dict(seen or dict.fromkeys(counts, 0))
        self._pending = [0] * len(self.seen)  # this rank's counts since the last reduction
        self.main = dist.is_main()
        if self.main:
            import yaml

            (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            (run_dir / "env.json").write_text(json.dumps(environment(), indent=1))
            for name, content in (files or {}).items():
                (run_dir / name).write_text(json.dumps(content))
        self.metrics = MetricsWriter(run_dir, keep_until=start_iter if resumed else None) if self.main else NullWriter()

    def count(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> None:
        """Add a detection batch (host-side sizes: no device sync)."""
        self.add(len(images), sum(len(t["labels"]) for t in targets), sum(im.shape[-1] * im.shape[-2] for im in images))

    def add(self, *counts: int) -> None:
        """Add to the counts, in ``seen``'s order."""
        self._pending = [a + b for a, b in zip(self._pending, counts, strict=True)]

    def reduce_seen(self) -> dict[str, int]:
        """The run's totals, every rank's counts included (a collective: call on every rank)."""
        for key, n in zip(self.seen, dist.sum_ints(self._pending)):
            self.seen[key] += n
        self._pending = [0] * len(self.seen)
        return self.seen

    def write(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)

    def checkpoint(self, name: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   scaler: Any, iteration: int, meta: dict[str, Any], window: LossWindow | None,
                   keep: int = 0, extra: dict[str, Any] | None = None) -> None:
        """Write ``name`` (every rank calls this: the counters and the loss window are reduced); ``extra``:
        more of the loop's state, saved beside them."""
        seen = self.reduce_seen()
        window_state = window.state() if window is not None else None
        device_rng = dist.gather_to_main(device_rng_state(_model_device(model)))  # each rank's own GPU stream
        if self.main:
            save_training_state(self.run_dir / name, model=model, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, iteration=iteration, meta=meta, config=self.config,
                                progress={"seen": seen, "window": window_state, **(extra or {})},
                                device_rng=device_rng)
            if keep:
                ckpt.prune(self.run_dir, keep)

    def finish(self, final: dict[str, Any]) -> None:
        if self.main:
            (self.run_dir / "final.json").write_text(json.dumps(final, indent=1))

    def close(self) -> None:
        self.metrics.close()
