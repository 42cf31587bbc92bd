"""Training-step speed of a preset on this machine: fp32 vs bf16 autocast, with and without
channels-last, on the same batches, side by side (seconds per iteration and ratio to fp32).

    python benchmarks/train_speed.py [PRESET] [key=value ...] [--iters 10] [--warmup 4]

Data loading is excluded (batches are prepared first); each variant builds the same model from
the same seed.  Numbers vary run to run by several percent on a shared machine: read the ratios.
"""

from __future__ import annotations

import argparse
import time

import torch

from scratchdet.cli import split_preset
from scratchdet.config import load_config
from scratchdet.data import CocoDetection, TrainSampler, build_transforms, collate, resolve_datasets
from scratchdet.model import build_model, model_kwargs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4)
    args = p.parse_args()
    split_preset(args)
    cfg = load_config(args.preset, args.overrides)
    (images, annotations), _ = resolve_datasets(cfg.data)
    ds = CocoDetection(images=images, annotations=annotations, filter_empty=True, transforms=build_transforms(
        train=True, min_sizes=cfg.data.min_size_train, max_size=cfg.data.max_size_train, flip_prob=cfg.data.flip_prob))
    stream = iter(TrainSampler(ds.aspect_ratios(), batch_size=cfg.solver.ims_per_batch, seed=0))
    batches = [collate([ds[k] for k in next(stream)]) for _ in range(args.warmup + args.iters)]
    results = {}
    for name, dtype, channels_last in (("fp32", None, False), ("fp32 channels-last", None, True),
                                       ("bf16", torch.bfloat16, False), ("bf16 channels-last", torch.bfloat16, True)):
        torch.manual_seed(0)
        model = build_model(**model_kwargs(cfg.model, ds.num_classes))
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.solver.base_lr, momentum=0.9)
        model.train()
        for i, (ims, tgts) in enumerate(batches):
            if i == args.warmup:
                t0 = time.perf_counter()
            ims = [x.float() for x in ims]
            tgts = [{k: t[k] for k in ("boxes", "labels", "masks")} for t in tgts]
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = sum(model(ims, tgts).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[name] = (time.perf_counter() - t0) / args.iters
    base = results["fp32"]
    print(f"{'variant':<20} {'s/iter':>8} {'vs fp32':>8}   ({args.iters} iterations of {cfg.solver.ims_per_batch} images, "
          f"{torch.get_num_threads()} threads)")
    for name, sec in results.items():
        print(f"{name:<20} {sec:8.3f} {base / sec:7.2f}x")


if __name__ == "__main__":
    main()
