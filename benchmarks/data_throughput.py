"""Training data pipeline throughput versus what training consumes, side by side in one run.

    python benchmarks/data_throughput.py [--workers 0 1 2] [--rounds 3] [--images 400]
                                         [--train-workers 0 1 2] [--r50] [--baseline REV]

The pipeline is measured alone, with no model: ``CocoDetection`` with the training transforms
(``engine.build_train_set``), ``TrainSampler`` and ``train_loader``, batches taken with ``next()``
as ``engine.train`` takes them, for each loader worker count.  Two cases, both under the default
preset (4 images per batch, horizontal flip):

- ``default``: the data ``scratchdet train`` uses with no arguments (the embedded synthetic set, 256x256);
- ``coco640``: a COCO-like folder of 640x480 JPEGs (200 images, 5-15 polygon instances each, COCO's
  80 non-contiguous category ids), generated deterministically in a temporary folder, trained at
  that size (shorter side 480, longer at most 640: the R50-FPN GN preset's transforms at that size).

The reference is what training consumes on this machine, measured in the same run: images/s of
``scratchdet train`` (a subprocess, as a user runs it) over a few iterations, read from its
``metrics.jsonl`` (the first window, with the warm-up, left out), on the same data and settings.
The trainer's images/s includes its own data loading at its ``dataloader.num_workers``; the
default case's trainer is also run at each of ``--train-workers``: the evidence for that setting.
``--r50`` also runs the R50-FPN GN preset on the 640x480 folder (2 images per batch, fp32 as the
preset says; on a 2-core CPU an iteration takes the better part of a minute, so it is opt-in).

``--baseline REV`` measures ``scratchdet/data.py`` as of git revision REV alongside (same cases,
same loader settings, interleaved) and reports the speed-up of the current one.

Rounds interleave every measurement (cases, worker counts, trainer runs) so that drift of a shared
machine hits all alike; tables report medians over rounds and their spread (min-max).
Writes JSON to ``$OUT/data_throughput.json`` (or ``benchmarks/out/``) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from scratchdet import data as current_data
from scratchdet.config import Config, load_config
from scratchdet.data import resolve_datasets
from scratchdet.engine import build_train_set

ROOT = Path(__file__).resolve().parents[1]
R50_PRESET = "mask_rcnn_R50_FPN_GN_scratch_3x"
# COCO's 80 category ids: 1..90 with these gaps (the loader maps them to contiguous labels).
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


# --------------------------------------------------------------------------- the 640x480 folder

def make_coco_folder(root: Path, *, images: int = 200, width: int = 640, height: int = 480, seed: int = 0) -> Path:
    """Write ``root/images/*.jpg`` and ``root/instances.json``: photos-like JPEGs (smooth colour fields,
    texture, filled shapes) with 5-15 polygon instances each (star-shaped polygons of 8-40 points, from
    about 10 px to half the image, a tenth of them in two parts), boxes and areas from the polygons.
    Deterministic for a seed."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    entries, anns = [], []
    for i in range(images):
        base = rng.uniform(30, 220, 3)
        angle, period = rng.uniform(0, math.pi), rng.uniform(20, 200)
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        pixels = base + 40 * wave[..., None] * rng.uniform(-1, 1, 3) + rng.normal(0, 10, (height, width, 3))
        canvas = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        image_id = i + 1
        for _ in range(int(rng.integers(5, 16))):
            parts = []
            for _ in range(2 if rng.random() < 0.1 else 1):
                r = math.exp(rng.uniform(math.log(5), math.log(min(width, height) / 2)))
                cx, cy = rng.uniform(0, width), rng.uniform(0, height)
                n = int(rng.integers(8, 41))
                t = np.sort(rng.uniform(0, 2 * math.pi, n))
                radius = r * rng.uniform(0.5, 1.0, n)
                px = np.clip(cx + radius * np.cos(t), 0, width)
                py = np.clip(cy + radius * np.sin(t), 0, height)
                parts.append(np.stack([px, py], 1))
            x0, y0 = min(p[:, 0].min() for p in parts), min(p[:, 1].min() for p in parts)
            x1, y1 = max(p[:, 0].max() for p in parts), max(p[:, 1].max() for p in parts)
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            for p in parts:
                draw.polygon([tuple(v) for v in p], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            # Shoelace area of each part (overlaps of the parts counted twice: COCO's areas are approximate too).
            area = sum(0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1)))
                       for p in parts)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.choice(COCO_IDS)),
                         "segmentation": [[round(float(v), 2) for v in p.ravel()] for p in parts],
                         "area": round(float(area), 2), "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                         "iscrowd": 0})
        name = f"{image_id:012d}.jpg"
        canvas.save(root / "images" / name, quality=90)
        entries.append({"id": image_id, "file_name": name, "height": height, "width": width})
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in COCO_IDS]
    with open(root / "instances.json", "w") as f:
        json.dump({"images": entries, "annotations": anns, "categories": categories}, f)
    return root


# --------------------------------------------------------------------------- cases

def case_configs(folder: Path) -> dict[str, tuple[str | None, list[str]]]:
    """(preset, overrides) of each case, as ``scratchdet train`` takes them; ``r50`` trains on ``coco640``'s data."""
    coco640 = [f"data.train.images={folder / 'images'}", f"data.train.annotations={folder / 'instances.json'}",
               "data.val.images=", "data.val.annotations=", "data.min_size_train=[480]", "data.max_size_train=640"]
    r50 = [*coco640, "solver.ims_per_batch=2", "solver.schedule=", "solver.reference_batch_size=0", "train.device=cpu"]
    return {"default": (None, []), "coco640": (None, coco640), "r50": (R50_PRESET, r50)}


def load_baseline(rev: str, tmp: Path) -> ModuleType:
    """``scratchdet/data.py`` as of git revision ``rev``, imported as a module of its own (its file in ``tmp``)."""
    source = subprocess.run(["git", "show", f"{rev}:scratchdet/data.py"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    path = tmp / "scratchdet_data_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def train_set_of(cfg: Config, module: ModuleType) -> Any:
    """The training set exactly as engine.build_train_set builds it, from ``module``'s classes."""
    (images, annotations), _ = resolve_datasets(cfg.data)
    if module is current_data:
        return build_train_set(cfg, (images, annotations))
    return module.CocoDetection(images=images, annotations=annotations, filter_empty=cfg.data.filter_empty,
                                transforms=module.build_transforms(train=True, min_sizes=cfg.data.min_size_train,
                                                                   max_size=cfg.data.max_size_train,
                                                                   flip_prob=cfg.data.flip_prob))


def pipeline_rate(module: ModuleType, dataset: Any, cfg: Config, *, workers: int, images: int) -> float:
    """Images/s of ``next(loader)`` in steady state (the loader's start and first batches left out)."""
    sampler = module.TrainSampler(dataset.aspect_ratios(), batch_size=cfg.solver.ims_per_batch, seed=cfg.train.seed,
                                  group_by_aspect=cfg.dataloader.aspect_ratio_grouping)
    loader = iter(module.train_loader(dataset, sampler, num_workers=workers, seed=cfg.train.seed))
    for _ in range(2 + 2 * workers):  # worker start-up, and each worker's prefetched batches
        next(loader)
    n, t0 = 0, time.perf_counter()
    while n < images:
        batch_images, _ = next(loader)
        n += len(batch_images)
    rate = n / (time.perf_counter() - t0)
    del loader  # shuts its workers down before the next measurement
    return rate


def train_rate(preset: str | None, overrides: list[str], *, workers: int, iters: int, period: int,
               tmp: Path) -> list[float]:
    """images_per_sec of each log window of a short ``scratchdet train`` run, the first (warm-up) left out."""
    out = Path(tempfile.mkdtemp(prefix="run_", dir=tmp))
    cmd = [sys.executable, "-m", "scratchdet", "train", *([preset] if preset else []), *overrides,
           f"dataloader.num_workers={workers}", f"solver.max_iter={iters}", f"train.log_period={period}",
           "solver.checkpoint_period=1000000", "test.eval_period=0", "test.max_images=2", "--out", str(out / "run")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    lines = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    shutil.rmtree(out, ignore_errors=True)  # an R50 checkpoint is hundreds of MB
    return [x["images_per_sec"] for x in lines if "images_per_sec" in x][1:]


# --------------------------------------------------------------------------- report

TARGET = 2.0  # the pipeline should deliver at least twice what training consumes, so data never waits
TRAIN_PERIOD = 5  # iterations per trainer log window (its images_per_sec is per window)


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2),
            "values": [round(v, 3) for v in values]}


def spread(s: dict[str, Any] | None) -> str:
    if s is None:
        return "n/a"
    digits = 1 if s["median"] >= 1 else 3
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts of the pipeline")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every measurement")
    p.add_argument("--images", type=int, default=400, help="images timed per pipeline measurement")
    p.add_argument("--train-workers", type=int, nargs="*", default=[0, 1, 2],
                   help="dataloader.num_workers of the default case's trainer runs (its preset's value is always run)")
    p.add_argument("--train-iters", type=int, default=20, help="iterations of each trainer run (log window: 5)")
    p.add_argument("--r50", action="store_true", help="also run the R50-FPN GN preset's trainer on coco640 (slow)")
    p.add_argument("--r50-iters", type=int, default=3, help="iterations of each R50-FPN GN trainer run (log window: 1)")
    p.add_argument("--r50-rounds", type=int, default=1, help="rounds that run the R50-FPN GN trainer")
    p.add_argument("--baseline", help="git revision whose scratchdet/data.py is measured alongside")
    args = p.parse_args()
    if args.train_iters < 2 * TRAIN_PERIOD or args.r50_iters < 2:
        p.error(f"--train-iters must be at least {2 * TRAIN_PERIOD} and --r50-iters at least 2: the first log window "
                "(the warm-up) is left out")

    tmp = Path(tempfile.mkdtemp(prefix="data_throughput_"))
    try:
        t0 = time.perf_counter()
        folder = make_coco_folder(tmp / "coco640")
        generate_s = time.perf_counter() - t0
        cases = case_configs(folder)
        modules = {"current": current_data}
        if args.baseline:
            modules[f"data.py@{args.baseline}"] = load_baseline(args.baseline, tmp)
        cfgs = {name: load_config(preset, overrides) for name, (preset, overrides) in cases.items()}
        piped = ("default", "coco640")
        datasets = {(name, m): train_set_of(cfgs[name], modules[m]) for name in piped for m in modules}
        # Trainer runs: (case, workers); each case's reference is its preset's own num_workers.
        runs = [("default", w) for w in sorted(set(args.train_workers) | {cfgs["default"].dataloader.num_workers})]
        runs.append(("coco640", cfgs["coco640"].dataloader.num_workers))
        pipe: dict[tuple[str, str, int], list[float]] = {}
        trainer: dict[tuple[str, int], list[float]] = {}
        for r in range(args.rounds):
            for name in piped:
                for workers in args.workers:
                    for m, module in modules.items():
                        rate = pipeline_rate(module, datasets[name, m], cfgs[name], workers=workers, images=args.images)
                        pipe.setdefault((name, m, workers), []).append(rate)
                        print(f"round {r} {name} {m} workers={workers}: pipeline {rate:.1f} images/s", flush=True)
            todo = runs + ([("r50", cfgs["r50"].dataloader.num_workers)] if args.r50 and r < args.r50_rounds else [])
            for name, workers in todo:
                iters, period = (args.r50_iters, 1) if name == "r50" else (args.train_iters, TRAIN_PERIOD)
                rates = train_rate(*cases[name], workers=workers, iters=iters, period=period, tmp=tmp)
                trainer.setdefault((name, workers), []).append(statistics.median(rates))
                print(f"round {r} {name} trainer workers={workers}: {rates} images/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    describe = {"default": "default preset, synthetic 256x256", "coco640": "default preset, 640x480 folder",
                "r50": f"{R50_PRESET}, 640x480 folder, 2 images per batch"}
    references = [("default", "default"), ("coco640", "coco640")] + ([("coco640", "r50")] if args.r50 else [])
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "settings": {"rounds": args.rounds, "images_per_measurement": args.images, "workers": args.workers,
                     "train_iters": args.train_iters, "r50": args.r50, "r50_iters": args.r50_iters,
                     "baseline": args.baseline, "coco640_generation_s": round(generate_s, 1),
                     "batch": {name: cfgs[name].solver.ims_per_batch for name in cases}},
        "trainer": {f"{name} workers={w}": {"config": describe[name], **summary(v)} for (name, w), v in trainer.items()},
        "pipeline": {f"{name} {m} workers={w}": summary(v) for (name, m, w), v in pipe.items()},
        "ratios": [],
    }
    print(f"\nTraining data pipeline vs what training consumes ({os.cpu_count()} CPUs, {args.rounds} rounds; images/s, "
          "median (min-max) over rounds)\n")
    print("| case | data.py | loader workers | pipeline | training consumes (scratchdet train) | pipeline / consumed "
          f"| {TARGET:g}x target |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case, ref in references:
        ref_workers = cfgs[ref].dataloader.num_workers
        consumed = summary(trainer[ref, ref_workers]) if (ref, ref_workers) in trainer else None
        for workers in args.workers:
            for m in modules:
                s = summary(pipe[case, m, workers])
                ratio = s["median"] / consumed["median"] if consumed else None
                result["ratios"].append({"case": case, "data": m, "workers": workers, "pipeline": s["median"],
                                         "reference": f"{describe[ref]}, dataloader.num_workers={ref_workers}",
                                         "consumed": consumed["median"] if consumed else None,
                                         "ratio": round(ratio, 1) if ratio else None,
                                         "target_met": ratio >= TARGET if ratio else None})
                print(f"| {case} | {m} | {workers} | {spread(s)} | {describe[ref]}: {spread(consumed)} | "
                      f"{f'{ratio:.0f}x' if ratio else 'n/a'} | "
                      f"{'n/a' if ratio is None else 'met' if ratio >= TARGET else 'NOT met'} |")
    if len(modules) > 1:
        base = next(m for m in modules if m != "current")
        print(f"\n| case | loader workers | current data.py | {base} | speed-up |")
        print("| --- | --- | --- | --- | --- |")
        result["speedup"] = {}
        for name in piped:
            for workers in args.workers:
                cur, old = summary(pipe[name, "current", workers]), summary(pipe[name, base, workers])
                result["speedup"][f"{name} workers={workers}"] = round(cur["median"] / old["median"], 2)
                print(f"| {name} | {workers} | {spread(cur)} | {spread(old)} | {cur['median'] / old['median']:.2f}x |")
    print("\n| trainer | dataloader.num_workers | images/s (median of the run's windows; over rounds: median (min-max)) |")
    print("| --- | --- | --- |")
    for (name, w), v in trainer.items():
        print(f"| {describe[name]} | {w} | {spread(summary(v))} |")
    out_dir = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "data_throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out_dir / 'data_throughput.json'}")


if __name__ == "__main__":
    main()
