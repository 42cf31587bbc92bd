"""Where a training step's time goes: torch.profiler over scratchdet's ``train_step`` on a case of
``train_throughput.py`` (the same model, batches and settings), self CPU (or CUDA) time per op.

    python benchmarks/profile_train_step.py [--case default] [--threads N] [--steps 6] [--rows 22]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402 - the benchmark's cases and builders, shared

from scratchdet.device import amp_dtype, pick_device
from scratchdet.engine import train_step  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="default", choices=list(tt.CASES))
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rows", type=int, default=22)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override on top of the case")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, batches = tt.prepare(args.case, args.warmup + args.steps, args.set)
    device = pick_device(cfg.train.device)
    model, opt = tt.build(cfg, device, scratchdet=True)
    params = [q for q in model.parameters() if q.requires_grad]
    dtype = amp_dtype(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(images: list, targets: list) -> None:
        train_step(model, images, targets, optimizer=opt, scaler=scaler, params=params, dtype=dtype, device=device)

    for images, targets in batches[:args.warmup]:
        step(images, targets)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for images, targets in batches[args.warmup:]:
            step(images, targets)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"case {args.case}: {args.steps} steps, {torch.get_num_threads()} threads, {device}")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
