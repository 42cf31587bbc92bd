"""Where and how a run computes: the device, the precision the hardware computes natively, the
memory format, seeds and deterministic algorithms.

``train``, ``pretrain``, ``eval``, the benchmarks and the studies all choose through these, so a
setting means the same everywhere (``train.device``, ``train.amp``, ``train.channels_last``,
``train.deterministic``).
"""

from __future__ import annotations

import logging
import os
import platform
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as dist
from .config import ConfigError

log = logging.getLogger("scratchdet")


def pick_device(name: str) -> torch.device:
    """``train.device`` as a device: ``auto`` is CUDA when there is a GPU, else the CPU.  Under
    torchrun (LOCAL_RANK set) each process takes the GPU of its local rank, decided here, before
    the process group exists, so every caller (training, ``eval``, the run stamp) gets an index."""
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
