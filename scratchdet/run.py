"""A run's setup and its record: the run directory, logging, device and precision, the metrics
writer, training-state checkpoints, and loading a finished run's model.

The training loop (``engine.train``) calls these; ``predict``, ``pretrain``, ``eval`` and the
reports use them too, so what a run directory holds is defined here, in one place.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed as dist

log = logging.getLogger("scratchdet")

# Everything a run writes into its directory; `--force` removes exactly these (a user's own
# files in the folder are left alone), so nothing of the old run survives beside the new one.
RUN_OUTPUTS = ("config.yaml", "env.json", "metrics.jsonl", "log.txt", "final.json", "coco_instances_results.json",
               "subset_image_ids.json", "tensorboard", "inference", "backbone_final.pth", "backbone_final.pth.sha256")


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
            "cpu_bf16": cpu_has_native_bf16(), "world_size": dist.world_size(), "argv": sys.argv}


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


def pick_device(name: str) -> torch.device:
    """``auto``: the local rank's GPU when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    if name == "cuda" and dist.world_size() > 1:
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def use_deterministic(setting: str, device: torch.device) -> bool:
    """``train.deterministic``: on, off, or auto (on for the CPU, off for CUDA, where deterministic
    mode sends RoIAlign's backward to torchvision's slow pure-PyTorch path)."""
    if setting == "auto":
        return device.type == "cpu"
    return setting == "on"


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # Detection inputs vary in size: cuDNN's per-shape autotuning would re-run for most batches.
    torch.backends.cudnn.benchmark = False


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 matmuls and convolutions are faster than fp32, not emulated."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype; ``auto`` is bf16 where the hardware computes it natively (on a CPU
    without native bf16, emulated bf16 would be slower than fp32), else off."""
    if amp == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
        return torch.bfloat16 if native else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# --------------------------------------------------------------------------- the run directory


def prepare_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse to overwrite a finished (or started) run unless ``--force``/``--resume`` say so;
    with ``--force``, remove every output of the old run (``RUN_OUTPUTS`` and checkpoints)."""
    started = (run_dir / ckpt.FINAL).exists() or (run_dir / "metrics.jsonl").exists() or \
        bool(ckpt.periodic_checkpoints(run_dir))
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


def save_training_state(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        scaler: Any, iteration: int, progress: dict[str, Any], meta: dict[str, Any],
                        config: dict[str, Any]) -> None:
    """Everything exact resume needs: weights, solver, AMP scaler, RNG states, the sampler's
    position (the iteration) and the loop's counters (``progress``)."""
    ckpt.save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "iteration": iteration, "rng": ckpt.rng_state(), "meta": meta,
        "config": config, **progress})


def restore_training_state(state: dict[str, Any], *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: Any, scaler: Any) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(state["rng"])


def load_run_model(run_dir: str | Path, checkpoint: str | Path | None = None, device: torch.device | None = None,
                   overrides: list[str] | tuple[str, ...] = ()) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """A trained run's model (``model_final.pth`` or the newest valid checkpoint), its config with
    ``overrides`` applied, and meta; built with the run's memory format, in eval mode."""
    from .config import from_dict, parse_override, set_key, validate
    from .model import build_model, model_kwargs

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
    for text in overrides:
        set_key(cfg, *parse_override(text))
    validate(cfg)
    meta = state["meta"]
    kwargs = model_kwargs(cfg.model, len(meta["class_names"]))
    model = build_model(**kwargs)
    model.load_state_dict(state["model"])
    model.to(device or pick_device(cfg.train.device)).eval()
    if cfg.train.channels_last:  # as the run evaluated itself: the same kernels, the same numbers
        model.to(memory_format=torch.channels_last)
    return model, cfg, meta
