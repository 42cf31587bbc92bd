"""Training throughput: scratchdet's step versus a torchvision-reference-style loop, side by side.

    python benchmarks/train_throughput.py [--case default|r50_gn_512|r50_gn_800sq_gpu|all] [--iters N]
                                          [--rounds R] [--precisions off,bf16]

Both loops train the same model (built from the same seed by ``scratchdet.model.build_model``) on
the same batches (prepared first: data loading is measured by ``data_throughput.py``) in the same
autocast precision and the same memory format.  The reference is the loop a user would write after torchvision's
``references/detection/engine.py`` (``train_one_epoch``) with torchvision's own parts: the model
as built (contiguous tensors; torchvision's RPN and MultiScaleRoIAlign where scratchdet runs
their CPU kernels in parallel threads),
``torch.optim.SGD`` with its default implementation, the loss summed, read on the host every
iteration to stop on a non-finite value, and every loss read for the metric logger.  scratchdet's
step is ``scratchdet.engine.train_step`` with the preset's runtime settings (memory format, fused
SGD with the device-side non-finite check).  The loops alternate in rounds (A B A B ...) so drift
of a shared machine hits both alike; the ratio is of the medians.  Peak memory: CUDA's allocator
peak per loop on a GPU; on the CPU each loop runs once more in a fresh process and reports its
peak resident set (ru_maxrss).

Each case runs once per precision in ``--precisions`` (``train.amp`` values; default ``off,bf16`` on a
CPU, fp32 and bf16 side by side, and the case's own setting on a GPU); the table states the host's
bf16 flags and what ``train.amp=auto`` picks there, so a figure is never read without the hardware
that made it.

Writes JSON to ``$OUT/train_throughput_CASE.json`` (or ``benchmarks/out/``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign

from scratchdet.config import load_config
from scratchdet.data import CocoDetection, TrainSampler, batch_sizes, build_transforms, collate, resolve_datasets
from scratchdet.device import (
    amp_dtype,
    cpu_bf16_support,
    cpu_capabilities,
    pick_device,
    precision_name,
    precision_reason,
    use_channels_last,
)
from scratchdet.engine import train_step
from scratchdet.model import build_model
from scratchdet.solver import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
# (preset, overrides): the default job's training step (prepared batches: not the data pipeline,
# which data_throughput.py measures); R50-FPN GN at 512 px on a CPU; R50-FPN GN on 800x800 synthetic
# squares (the paper's 800 px shorter side; a COCO image would be about 800x1200), 2 images per GPU,
# on a GPU.  The R50 cases train on the synthetic shapes resized to the case's size (the step's cost
# depends on sizes and instance counts, not on the pictures).  --set changes precision, batch and
# memory format for both loops (benchmarks/gpu.sh runs the grid).
CASES: dict[str, tuple[str, list[str]]] = {
    "default": ("default", []),
    "r50_gn_512": ("mask_rcnn_R50_FPN_GN_scratch_3x", [
        "data.train.images=", "data.train.annotations=", "data.val.images=", "data.val.annotations=",
        "data.min_size_train=[512]", "data.max_size_train=853", "solver.ims_per_batch=2", "model.num_classes=0",
        "train.amp=auto", "train.channels_last=true"]),
    "r50_gn_800sq_gpu": ("mask_rcnn_R50_FPN_GN_scratch_3x", [
        "data.train.images=", "data.train.annotations=", "data.val.images=", "data.val.annotations=",
        "data.synth.image_size=800", "data.synth.num_train=64", "data.synth.num_val=4",
        "data.min_size_train=[800]", "data.max_size_train=1333", "solver.ims_per_batch=2", "model.num_classes=0",
        "train.amp=auto", "train.channels_last=off", "train.device=cuda"]),
}


def prepare(case: str, n: int, extra: list[str] = ()) -> tuple[Any, list]:
    preset, overrides = CASES[case]
    cfg = load_config(preset, [*overrides, *extra])
    (images, annotations), _ = resolve_datasets(cfg.data)
    ds = CocoDetection(images=images, annotations=annotations, filter_empty=True, transforms=build_transforms(
        train=True, min_sizes=cfg.data.min_size_train, max_size=cfg.data.max_size_train, flip_prob=cfg.data.flip_prob))
    cfg.model.num_classes = ds.num_classes
    stream = iter(TrainSampler(ds.aspect_ratios(), batch_size=cfg.solver.ims_per_batch, seed=0, sizes=batch_sizes(cfg.data)))
    return cfg, [collate([ds[k] for k in next(stream)]) for _ in range(n)]


def build(cfg: Any, device: torch.device, *, scratchdet: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    s = cfg.solver
    if use_channels_last(cfg.train.channels_last, device):  # both loops: a ratio of like with like
        model = model.to(memory_format=torch.channels_last)
    if scratchdet:
        opt = build_optimizer(model, base_lr=s.base_lr, momentum=s.momentum, weight_decay=s.weight_decay,
                              weight_decay_norm=s.weight_decay_norm, weight_decay_bias=s.weight_decay_bias)
    else:
        # torchvision's own parts where scratchdet has CPU-threaded subclasses (no state of their
        # own: the same parameters, the same computation, torchvision's kernels one at a time).
        model.rpn.__class__ = RegionProposalNetwork
        model.roi_heads.box_roi_pool.__class__ = MultiScaleRoIAlign
        model.roi_heads.mask_roi_pool.__class__ = MultiScaleRoIAlign
        # torchvision's references/detection/train.py: SGD over the trainable parameters
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=s.base_lr, momentum=s.momentum,
                              weight_decay=s.weight_decay)
    model.train()
    return model, opt


def reference_step(model: torch.nn.Module, opt: torch.optim.Optimizer, images: list, targets: list,
                   dtype: torch.dtype | None, device: torch.device) -> None:
    """``train_one_epoch``'s body: to device, forward under autocast, host-side finiteness check,
    backward, step, and every loss read for the logger."""
    images = [im.to(device).float() for im in images]
    targets = [{k: v.to(device) for k, v in t.items() if k in ("boxes", "labels", "masks")} for t in targets]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss_dict = model(images, targets)
        losses = sum(loss for loss in loss_dict.values())
    loss_value = losses.item()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"loss is {loss_value}")
    opt.zero_grad()
    losses.backward()
    opt.step()
    _ = {k: v.item() for k, v in loss_dict.items()}  # MetricLogger.update


def run_loop(kind: str, cfg: Any, batches: list, device: torch.device, warmup: int) -> tuple[float, int]:
    """Seconds per iteration over the batches after ``warmup``, and the CUDA peak (0 on CPU)."""
    dtype = amp_dtype(cfg.train.amp, device)
    model, opt = build(cfg, device, scratchdet=kind == "scratchdet")
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = 0.0
    for i, (images, targets) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        if kind == "scratchdet":
            train_step(model, images, targets, optimizer=opt, scaler=scaler, params=params, dtype=dtype, device=device)
        else:
            reference_step(model, opt, images, targets, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return (time.perf_counter() - t0) / (len(batches) - warmup), peak


def cpu_peak_rss(case: str, kind: str, iters: int, warmup: int, extra: list[str]) -> int:
    """Peak resident set (bytes) of one loop in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--case", case, "--iters", str(iters), "--warmup", str(warmup),
                          "--_peak", kind, *[f"--set={e}" for e in extra]], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def measure(case: str, *, iters: int, warmup: int, rounds: int, extra: list[str]) -> dict[str, Any]:
    cfg, batches = prepare(case, warmup + iters, extra)
    device = pick_device(cfg.train.device)
    times: dict[str, list[float]] = {"reference": [], "scratchdet": []}
    peaks: dict[str, int] = {}
    for _ in range(rounds):
        for kind in times:
            sec, peak = run_loop(kind, cfg, batches, device, warmup)
            times[kind].append(sec)
            peaks[kind] = max(peaks.get(kind, 0), peak)
    if device.type == "cpu":
        peaks = {kind: cpu_peak_rss(case, kind, iters, warmup, extra) for kind in times}
    ips = {k: cfg.solver.ims_per_batch / statistics.median(v) for k, v in times.items()}
    return {"case": case, "overrides": extra, "device": str(device),
            "precision": precision_name(amp_dtype(cfg.train.amp, device)),
            "channels_last": use_channels_last(cfg.train.channels_last, device),
            "ims_per_batch": cfg.solver.ims_per_batch, "image_size": [cfg.data.min_size_train, cfg.data.max_size_train],
            "iters": iters, "rounds": rounds, "threads": torch.get_num_threads(),
            "seconds_per_iter": times, "images_per_sec": ips, "ratio": ips["scratchdet"] / ips["reference"],
            "peak_memory_bytes": peaks, "cpu": cpu_capabilities().get("cpu_name"), "cpu_bf16": cpu_bf16_support()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="all", choices=[*CASES, "all", "cpu"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override on top of the case (e.g. --set train.amp=off), for both loops")
    p.add_argument("--precisions", default=None,
                   help="comma-separated train.amp values, each case measured in each (default: off,bf16 on a CPU; "
                        "the case's own on a GPU); 'case' keeps the case's setting")
    p.add_argument("--_peak", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._peak:  # the child of cpu_peak_rss: one loop, then its peak RSS
        cfg, batches = prepare(args.case, args.warmup + args.iters, args.set)
        run_loop(args._peak, cfg, batches, pick_device(cfg.train.device), args.warmup)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return 0
    gpu = torch.cuda.is_available()
    cases = [c for c in CASES if args.case in ("all", c) or (args.case == "cpu" and not c.endswith("gpu"))]
    results = []
    for case in cases:
        if case.endswith("gpu") and not gpu:
            print(f"{case}: skipped (no GPU on this machine)", file=sys.stderr)
            continue
        precisions = (args.precisions or ("case" if gpu else "off,bf16")).split(",")
        for amp in precisions:
            extra = args.set + ([] if amp == "case" else [f"train.amp={amp}"])
            results.append(measure(case, iters=args.iters, warmup=args.warmup, rounds=args.rounds, extra=extra))
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_throughput_{args.case}.json").write_text(json.dumps(results, indent=1))
    flags = cpu_bf16_support()[1]
    cpu = cpu_capabilities().get("cpu_name") or platform.machine()
    print(f"host CPU: {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}; bf16 flags: {flags}; "
          f"train.amp=auto picks {precision_name(amp_dtype('auto', torch.device('cpu')))} on this CPU "
          f"({precision_reason('auto', torch.device('cpu'))})")
    print("| case | device | precision | layout | batch | reference img/s | scratchdet img/s | ratio | "
          "peak MiB ref / ours |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        mib = {k: v / 2**20 for k, v in r["peak_memory_bytes"].items()}
        print(f"| {r['case']} | {r['device']} | {r['precision']} | "
              f"{'channels-last' if r['channels_last'] else 'NCHW'} | {r['ims_per_batch']} | "
              f"{r['images_per_sec']['reference']:.2f} | {r['images_per_sec']['scratchdet']:.2f} | "
              f"{r['ratio']:.2f}x | {mib['reference']:.0f} / {mib['scratchdet']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
