"""What every training loop shares: ``engine.train`` (detection) and ``pretrain.pretrain``
(classification) are both written on these.

- ``start_run``: the device, the process group (detection only), the run directory, logging,
  threads, seeds and the precision, in that order.
- ``StopSignal``: SIGTERM/SIGINT (a cluster's preemption, a Ctrl-C) finish the iteration, then
  the loop checkpoints and exits; the handlers are restored after the loop.
- ``Throughput``: images/s of training alone; evaluation and checkpoint time is left out.
- ``optimize``: backward and SGD step, a non-finite loss or gradient skipping the step on the device.
- ``check_nonfinite`` and ``log_line``: the host reads the device's loss window only at log
  lines and checkpoints (``run.LossWindow``), never inside a step.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from . import distributed as dist
from .config import Config
from .device import amp_dtype, pick_device, seed_everything, sync_device, use_deterministic
from .run import LossWindow, NonFiniteLossError, prepare_on_main, setup_logging
from .solver import GradientClipper, skip_nonfinite_step

log = logging.getLogger("scratchdet")


def start_run(cfg: Config, run_dir: Path, *, resume: bool, force: bool, dry_run: bool = False,
              distributed: bool = True) -> tuple[torch.device, torch.dtype | None, bool, bool]:
    """Set a run up; returns its device, autocast dtype (None: fp32), and ``resume``/``force`` as
    torchrun's restarts leave them.  ``distributed``: join the process group (detection training
    under torchrun); ``dry_run``: nothing is written, no process group."""
    device = pick_device(cfg.train.device)
    if not dry_run:
        if distributed:
            dist.init(device, timeout_s=cfg.train.dist_timeout)
            if dist.restarted():  # torchrun --max-restarts runs the same command line again: continue, never wipe
                log.warning("restart %s by torchrun: resuming %s", os.environ["TORCHELASTIC_RESTART_COUNT"], run_dir)
                resume, force = True, False
        prepare_on_main(run_dir, resume=resume, force=force)  # a finished run (model_final.pth) needs --force
    setup_logging(None if dry_run else run_dir)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed, use_deterministic(cfg.train.deterministic, device),
                    strict=cfg.train.deterministic == "on")
    # Precision is the only thing the hardware changes: the schedule, LR and data are the same in bf16 and fp32.
    return device, amp_dtype(cfg.train.amp, device), resume, force


class StopSignal:
    """SIGTERM/SIGINT set a flag the loop reads after each iteration (``received``), inside a
    ``with`` block; the previous handlers come back when it ends."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def received(self) -> bool:
        """A signal on any rank (a collective under torchrun: every rank stops after the same iteration)."""
        return dist.any_rank(self.signum is not None)


class Throughput:
    """Training images/s and time per iteration since the last ``read``; time inside ``paused``
    (evaluation, checkpoints) is left out."""

    def __init__(self, *, device: torch.device) -> None:
        self.device = device
        self._start, self._steps, self._other = time.perf_counter(), 0, 0.0

    def step(self) -> None:
        self._steps += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        sync_device(self.device)  # the steps queued before the pause are training time, counted as such
        t = time.perf_counter()
        try:
            yield
        finally:
            sync_device(self.device)
            self._other += time.perf_counter() - t

    def read(self, ims_per_batch: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self._start - self._other
        out = {"images_per_sec": round(self._steps * ims_per_batch / elapsed, 3),
               "time_per_iter": round(elapsed / self._steps, 4)}
        self._start, self._steps, self._other = time.perf_counter(), 0, 0.0
        return out


def check_nonfinite(window: LossWindow | None, iteration: int, *, limit: int, scheduler: Any, run_dir: Path,
                    what: str = "iteration") -> None:
    """Stop when more steps were skipped for a non-finite loss or gradient than ``solver.skip_nonfinite``
    allows (reads the device); the message gives the LR the ``LambdaLR`` scheduler set at the first one."""
    n, first, terms = window.nonfinite() if window is not None else (0, -1, [])
    if n > limit:
        lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](first)
        raise NonFiniteLossError(
            f"non-finite {', '.join(terms)} at {what} {first} (lr {lr:g}); {n} step(s) skipped by "
            f"iteration {iteration} (solver.skip_nonfinite={limit}); the last good checkpoint is kept in {run_dir}")


def log_line(window: LossWindow, throughput: Throughput, *, iteration: int, lr: float, ims_per_batch: int,
             seen: dict[str, int], keep: Callable[[dict[str, float]], dict[str, float]] = dict,
             bar: Any = None) -> dict[str, Any]:
    """A log line of ``metrics.jsonl``: the window's mean losses (``keep`` picks which; none when every
    step of the window was skipped), the LR, throughput, what was seen, and the skipped steps."""
    means, steps = window.read()  # the host waits for the device here, once per log line
    line = {"iteration": iteration, **(keep(means) if steps else {}), "lr": lr, **throughput.read(ims_per_batch),
            **seen}
    n, first, terms = window.nonfinite()
    if n:
        line.update(skipped_steps=n, skipped_step=f"{', '.join(terms)} at iteration {first}")
    if steps and bar is not None:
        bar.set_postfix(loss=f"{line['loss']:.3f}", lr=f"{lr:.2g}", ips=f"{line['images_per_sec']:.1f}")
    return line


def optimize(total: torch.Tensor, *, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             params: list[torch.nn.Parameter], clip: GradientClipper | None = None) -> torch.Tensor:
    """Backward and SGD step on the summed loss, without waiting for the device; returns ``bad``, a device
    bool: the step was skipped for a non-finite loss or gradient on some rank.

    One combined check on the device, agreed by all ranks: a non-finite loss or gradient skips the step
    (torchvision's reference engine stops on a non-finite loss, reading it on the host every iteration;
    with fp16 the GradScaler skips overflows by itself).  The host reads the count at log lines and
    checkpoints.  ``clip`` (``solver.build_gradient_clipper``) bounds the gradients before the step.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if scaler.is_enabled():
        bad = dist.all_reduce_((~torch.isfinite(total.detach())).int(), "max").bool()
        if clip is not None:  # on the true gradients: the scaler's factor divided out first
            scaler.unscale_(optimizer)
            clip([p.grad for p in params if p.grad is not None], None)
        scaler.step(optimizer)
        scaler.update()
        return bad
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    bad = dist.all_reduce_((~torch.isfinite(total.detach() + grad_norm)).int(), "max").bool()
    if clip is not None:
        clip(grads, grad_norm)
    skip_nonfinite_step(optimizer, bad)
    return bad
