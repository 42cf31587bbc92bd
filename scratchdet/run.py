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


def pick_device(name: str) -> torch.device:
    """``train.device`` as a device: ``auto`` is CUDA when there is a GPU, else the CPU.  Under
    torchrun (LOCAL_RANK set) each process takes the GPU of its local rank, decided here, before
    the process group exists, so every caller (training, ``eval``, the run stamp) gets an index."""
    from .config import ConfigError

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        # Refused here, in one line, not by torch's "Found no NVIDIA driver" traceback from model.to(device).
        raise ConfigError(f"train.device={name}: torch sees no CUDA GPU (torch {torch.__version__}, "
                          f"{'CUDA build ' + torch.version.cuda if torch.version.cuda else 'a CPU-only build'}, "
                          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')!r}); "
                          "use train.device=cpu or auto")
    if "LOCAL_RANK" not in os.environ:
        if device.index is not None:
            if device.index >= torch.cuda.device_count():
                raise ConfigError(f"train.device={name}: only {torch.cuda.device_count()} GPU(s) visible "
                                  f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
            # The current device is what torch uses where no device is named: the pin-memory thread, the
            # caching allocator's first context, is_bf16_supported().  Without this, cuda:1 also sets up GPU 0.
            torch.cuda.set_device(device)
        return device

    if device.index is not None:
        # Every rank would take the same GPU, and NCCL refuses two ranks on one device.
        raise ConfigError(f"train.device={name}: under torchrun each process takes the GPU of its local rank; give "
                          "train.device=cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    gpus, local = torch.cuda.device_count(), dist.local_rank()
    procs = max(int(os.environ.get("LOCAL_WORLD_SIZE", local + 1)), local + 1)
    if procs > gpus:
        raise ConfigError(f"{procs} processes on this machine but {gpus} visible GPU(s): one process per GPU "
                          f"(--num-gpus / torchrun --nproc-per-node at most {gpus}), or train.device=cpu")
    return torch.device("cuda", local)


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only): timers around evaluation and checkpoints
    would otherwise count training steps still running on the GPU as the pause, or the reverse."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def use_deterministic(setting: str, device: torch.device) -> bool:
    """``train.deterministic``: on, off, or auto (on for the CPU, off for CUDA, where deterministic
    mode sends RoIAlign's backward to torchvision's slow pure-PyTorch path)."""
    if setting == "auto":
        return device.type == "cpu"
    return setting == "on"


def seed_everything(seed: int, deterministic: bool, *, strict: bool = False) -> None:
    """Seed every RNG and choose the algorithms; ``strict`` (``train.deterministic=on``) makes an
    op without a deterministic implementation an error instead of a warning."""
    if deterministic and strict:
        # cuBLAS reads this when it creates its handle (the first matmul, after dist.init): without it,
        # its split-K reductions are nondeterministic and torch raises in deterministic mode.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=not strict)
    # Deterministic mode also fills the memory of every new tensor (each op's output) with NaN, so that a kernel
    # reading memory it never wrote still repeats itself: 10% of the default job's step on the CPU (0.48 against
    # 0.43 s).  The detector reads no unwritten memory (its losses and weights are the same to the bit without
    # the fill), so only strict mode (train.deterministic=on) keeps that guard.
    torch.utils.deterministic.fill_uninitialized_memory = strict
    # Detection inputs vary in size: cuDNN's per-shape autotuning would re-run for most batches.
    torch.backends.cudnn.benchmark = False


def use_channels_last(setting: str, device: torch.device) -> bool:
    """``train.channels_last``: on, off, or auto: on where it was measured to pay, the CPU.  Not on
    CUDA: ATen's GroupNorm makes CUDA inputs contiguous, so each GN layer would convert to NCHW and
    the next conv back (unmeasured there, and the SyncBN models with it)."""
    if setting == "auto":
        return device.type == "cpu"
    return setting == "on"


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 matmuls and convolutions natively, and the flags that say so.

    Native means instructions that multiply bf16: AVX512-BF16 or AMX-BF16 on x86, the BF16
    extension (NEON or SVE) on ARM.  oneDNN's own "bf16 supported" (``_is_mkldnn_bf16_supported``)
    is true on any AVX-512 CPU, where it converts bf16 to fp32 and back around fp32 arithmetic:
    3-4x slower than fp32 on a Xeon without AVX512-BF16 (Skylake-SP to Ice Lake), so it is not asked.
    """
    if not torch.backends.mkldnn.is_available():  # torch's own bf16 convolutions are emulated without oneDNN
        return False, "this torch is built without oneDNN"
    caps = cpu_capabilities()
    x86 = [f for f in ("avx512_bf16", "amx_bf16") if caps.get(f)]
    arm = [f for f in ("bf16", "sve_bf16") if caps.get(f)]
    found = x86 or arm
    if found:
        return True, " and ".join(found)
    arch = caps.get("architecture") or platform.machine()
    return False, f"no AVX512-BF16, AMX-BF16 or ARM BF16 among the {arch} CPU's flags"


def cpu_capabilities() -> dict[str, Any]:
    """The CPU's instruction-set flags as torch's cpuinfo reads them (``torch.cpu.get_capabilities``);
    on a torch without that function, the flags of ``/proc/cpuinfo`` (Linux), else none."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return dict(get())
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    # /proc/cpuinfo spells AMX-BF16 amx_bf16 and AVX512-BF16 avx512_bf16 on x86, and BF16 bf16 / svebf16 on ARM.
    return {"architecture": platform.machine(), **{f: True for f in flags},
            **({"sve_bf16": True} if "svebf16" in flags else {})}


def cuda_bf16_support(device: torch.device) -> tuple[bool, str]:
    """Whether this GPU computes bf16 natively (compute capability 8.0 or newer, or ROCm).  torch's
    ``is_bf16_supported()`` also counts emulation (true on a V100 or T4, where bf16 runs slower than
    fp32) and asks the current device, not the run's; this is its ``including_emulation=False`` answer
    for ``device``."""
    if torch.version.hip:
        return True, "ROCm"
    props = torch.cuda.get_device_properties(device)
    major, minor = props.major, props.minor
    return major >= 8, f"compute capability {major}.{minor}"


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """``cuda_bf16_support`` or ``cpu_bf16_support``, by the device's type."""
    return cuda_bf16_support(device) if device.type == "cuda" else cpu_bf16_support()


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype; ``auto`` is bf16 where the hardware computes it natively (on a CPU
    without native bf16, emulated bf16 would be slower than fp32), else off.  A forced ``bf16`` on
    hardware that only emulates it runs, with a warning.  On CUDA, ``auto`` also lets the fp32
    matmuls and convolutions that remain (GroupNorm's neighbours, the box predictors) use TF32, and
    ``off`` keeps them in full fp32; the log says which."""
    if amp in ("auto", "bf16"):
        native, why = bf16_support(device)
        if amp == "auto":
            dtype = torch.bfloat16 if native else None
        else:
            dtype = torch.bfloat16
            if not native:
                log.warning("train.amp=bf16 on hardware that only emulates bf16 (%s, %s): expect it to be slower "
                            "than fp32 (train.amp=auto or off trains in fp32 here)", device.type.upper(), why)
    else:
        dtype = {"off": None, "fp16": torch.float16}[amp]
    if device.type == "cuda":
        tf32 = amp == "auto"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32  # torch's default is True: `off` means fp32 convolutions too
        log.info("CUDA precision: %s autocast; fp32 matmuls and convolutions in %s",
                 precision_name(dtype) if dtype is not None else "no", "TF32" if tf32 else "full fp32")
    return dtype


def precision_reason(amp: str, device: torch.device) -> str:
    """Why ``train.amp`` gives the precision it does here, for the log line ``precision: ...``."""
    if amp != "auto":
        return f"train.amp={amp}"
    native, why = bf16_support(device)
    return f"train.amp=auto: {'native bf16' if native else 'bf16 would be emulated'} ({why})"


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


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
    from .model import build_model, model_kwargs

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
    kwargs = model_kwargs(cfg.model, len(meta["class_names"]), meta.get("num_keypoints"))
    model = build_model(**kwargs)
    model.load_state_dict(state["model"])
    device = device or pick_device(cfg.train.device)
    model.to(device).eval()
    if use_channels_last(cfg.train.channels_last, device):  # as the run evaluated itself: the same kernels
        model.to(memory_format=torch.channels_last)
    return model, cfg, meta


def branch_name(iteration: int) -> str:
    """A trunk's checkpoint at a branch point (``ckpt.prune`` never matches this name)."""
    return f"branch_{iteration:07d}.pth"


# What a branch may change: the length and where its LR drops (start_branch checks the trunk is at its
# base LR up to the branch point, whichever rule placed the drops).
BRANCH_FREE_KEYS = ("solver.schedule", "solver.max_iter", "solver.steps", "solver.epochs")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"section.key": value}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys, sorted, whose values differ between two flattened configs (a key missing from one differs)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def start_branch(trunk_dir: str | Path, run_dir: str | Path, at: int, *, config: dict[str, Any] | None = None,
                 num_images: int | None = None, end: int | None = None) -> bool:
    """Start ``run_dir`` as a schedule branch of ``trunk_dir`` at iteration ``at``: the trunk's
    branch checkpoint becomes the run's ``model_{at}.pth`` and the trunk's metrics up to ``at``
    (each marked ``branched_from``) its ``metrics.jsonl``, so a plain resume trains the tail.
    Returns False (and changes nothing) when the run has started already: it resumes as it is."""
    import yaml

    from .config import from_dict, resolve_schedule

    trunk_dir, run_dir = Path(trunk_dir), Path(run_dir)
    if (run_dir / ckpt.FINAL).exists() or ckpt.periodic_checkpoints(run_dir):
        return False
    if config is not None and (trunk_dir / "config.yaml").is_file():
        # A branch is the trunk's own run up to ``at`` only when nothing but the schedule's length differs.
        raw = yaml.safe_load((trunk_dir / "config.yaml").read_text()) or {}
        theirs, ours = flatten(raw), flatten(config)
        differ = [k for k in differing_keys(theirs, ours) if k not in BRANCH_FREE_KEYS]
        if differ:
            raise FileExistsError(f"{run_dir}: cannot branch from {trunk_dir}: its config differs in "
                                  f"{', '.join(differ[:6])} (a branch may differ only in {', '.join(BRANCH_FREE_KEYS)})")
        # ... and only when the trunk was still at its base LR up to ``at``: a trunk whose LR dropped
        # earlier (a shorter length, or solver.steps of its own) is another run before the branch point.
        trunk = resolve_schedule(from_dict(raw).solver, num_images)
        if trunk.steps and trunk.steps[0] < at:
            raise FileExistsError(f"{run_dir}: cannot branch from {trunk_dir} at iteration {at}: the trunk's LR "
                                  f"dropped at iteration {trunk.steps[0]}, before the branch point (LR drops "
                                  f"{list(trunk.steps)}); the trunk must be the arm's length with the latest "
                                  "first drop")
    source = trunk_dir / branch_name(at)
    if (problem := ckpt.verify(source)) is not None:
        raise FileNotFoundError(f"{source}: {problem}; the trunk {trunk_dir} saves it when it reaches iteration {at} "
                                f"(train it with --keep-at {at})")
    run_dir.mkdir(parents=True, exist_ok=True)
    # The curve before the branch point is the trunk's (the same run up to there): copied, marked.
    # Written before the checkpoint, which marks the branch as started: a branch killed in between
    # starts again rather than resuming without the trunk's curve.
    # A branch point at the branch's end (``end``): the trunk's evaluation there is the branch's final one,
    # which the branch runs itself (a run alone evaluates once at its end).
    records = [{**r, "branched_from": str(trunk_dir.resolve())} for r in read_metrics(trunk_dir)
               if "iteration" in r and r["iteration"] <= at
               and not (r["iteration"] == at == end and ("matches" in r or any("/" in k for k in r)))]
    ckpt.atomic_write_bytes(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    target = run_dir / f"model_{at:07d}.pth"
    ckpt.atomic_write_bytes(target, source.read_bytes())
    digest = source.with_name(source.name + ".sha256").read_text().split()[0]  # verified above
    ckpt.atomic_write_bytes(target.with_name(target.name + ".sha256"), f"{digest}  {target.name}\n".encode())
    log.info("schedule branch of %s at iteration %d (its first LR drop): %s", trunk_dir, at, run_dir)
    return True


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
                 seen: dict[str, int] | None = None, files: dict[str, Any] | None = None) -> None:
        self.run_dir, self.config = run_dir, config
        self.seen = dict(seen or {"images_seen": 0, "instances_seen": 0, "pixels_seen": 0})
        self._pending = [0, 0, 0]  # this rank's counts since the last reduction
        self.main = dist.is_main()
        if self.main:
            import yaml

            (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            (run_dir / "env.json").write_text(json.dumps(environment(), indent=1))
            for name, content in (files or {}).items():
                (run_dir / name).write_text(json.dumps(content))
        self.metrics = MetricsWriter(run_dir, keep_until=start_iter if resumed else None) if self.main else NullWriter()

    def count(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> None:
        """Add a batch (host-side sizes: no device sync)."""
        self._pending[0] += len(images)
        self._pending[1] += sum(len(t["labels"]) for t in targets)
        self._pending[2] += sum(im.shape[-1] * im.shape[-2] for im in images)

    def reduce_seen(self) -> dict[str, int]:
        """The run's totals, every rank's counts included (a collective: call on every rank)."""
        for key, n in zip(self.seen, dist.sum_ints(self._pending)):
            self.seen[key] += n
        self._pending = [0, 0, 0]
        return self.seen

    def write(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)

    def checkpoint(self, name: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   scaler: Any, iteration: int, meta: dict[str, Any], window: LossWindow | None,
                   keep: int = 0) -> None:
        """Write ``name`` (every rank calls this: the counters and the loss window are reduced)."""
        seen = self.reduce_seen()
        window_state = window.state() if window is not None else None
        device_rng = dist.gather_to_main(device_rng_state(_model_device(model)))  # each rank's own GPU stream
        if self.main:
            save_training_state(self.run_dir / name, model=model, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, iteration=iteration, meta=meta, config=self.config,
                                progress={"seen": seen, "window": window_state}, device_rng=device_rng)
            if keep:
                ckpt.prune(self.run_dir, keep)

    def finish(self, final: dict[str, Any]) -> None:
        if self.main:
            (self.run_dir / "final.json").write_text(json.dumps(final, indent=1))

    def close(self) -> None:
        self.metrics.close()
