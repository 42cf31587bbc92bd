"""The ``scratchdet`` command: train, eval, predict, data synth, data stats, presets, config."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import ConfigError, describe, list_presets, load_config


def split_preset(args: argparse.Namespace) -> None:
    """`scratchdet train key=value ...`: the first word is an override, not a preset."""
    if args.preset is not None and "=" in args.preset:
        args.overrides.insert(0, args.preset)
        args.preset = None


def _add_run_arguments(p: argparse.ArgumentParser, *, preset_help: str, overrides_help: str, out_help: str) -> None:
    """The positional preset and overrides and the run-directory options that train and pretrain share."""
    p.add_argument("preset", nargs="?", help=preset_help)
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--out", help=out_help)
    p.add_argument("--force", action="store_true", help="overwrite a run directory that already holds a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train(args: argparse.Namespace) -> int:
    from .engine import train

    split_preset(args)
    if args.resume:
        # The run's own resolved config, unless a preset is named; overrides apply on top.
        run_dir = Path(args.resume)
        cfg_file = run_dir / "config.yaml"
        cfg = load_config(args.preset or (str(cfg_file) if cfg_file.exists() else None), args.overrides)
    else:
        cfg = load_config(args.preset, args.overrides)
        name = Path(args.preset).stem if args.preset else "default"
        run_dir = Path(args.out) if args.out else Path("runs") / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
    result = train(cfg, run_dir, resume=bool(args.resume), force=args.force, dry_run=args.dry_run,
                   progress=not args.no_progress)
    if args.dry_run:
        print(json.dumps(result, indent=1))
        print(f"dry run: model, data and schedule built; nothing trained (would write to {run_dir})")
        return 0
    line = "  ".join(f"{k} {result[k]:.2f}" for k in ("bbox/AP", "segm/AP") if k in result)
    print(f"done: {line or 'no validation set, no AP'}")
    print(f"run directory: {run_dir}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    split_preset(args)
    cfg = load_config(args.preset, args.overrides)
    run_dir = Path(args.out) if args.out else Path("runs") / f"pretrain_{time.strftime('%Y%m%d-%H%M%S')}"
    out = pretrain(cfg, run_dir, force=args.force, progress=not args.no_progress)
    print(f"backbone: {out}\nfine-tune with: scratchdet train model.init={out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluation import STAT_NAMES, evaluate_coco, infer_iou_type

    if args.results:
        if not args.annotations:
            raise ConfigError("eval --results needs --annotations GT.json")
        for res in args.results:
            with open(res) as f:
                results = json.load(f)
            iou_type = args.iou_type or infer_iou_type(results)
            stats, text = evaluate_coco(args.annotations, results, iou_type)
            print(f"{res}: type={iou_type}")
            print(text, end="")
            print(json.dumps({f"{iou_type}/{k}": round(stats[k], 3) for k in STAT_NAMES}))
        return 0
    if not args.run:
        raise ConfigError("eval needs --run RUN_DIR, or --annotations GT.json --results RES.json")
    import torch

    from .engine import build_eval, load_run_model, pick_device
    from .evaluation import evaluate_model

    device = pick_device(args.device)
    model, cfg, meta = load_run_model(args.run, args.checkpoint, device)
    from .config import parse_override, set_key

    for text in args.overrides:
        set_key(cfg, *parse_override(text))
    from .data import resolve_datasets

    _, val = resolve_datasets(cfg.data)
    if val is None:
        raise ConfigError("the run has no validation set; give data.val.images=DIR data.val.annotations=FILE")
    loader, gt = build_eval(cfg, val)
    label_to_cat_id = {int(k): int(v) for k, v in meta["label_to_cat_id"].items()}
    out = Path(args.run) / "inference"
    out.mkdir(exist_ok=True)
    with torch.no_grad():
        metrics = evaluate_model(model, loader, gt=gt, device=device, label_to_cat_id=label_to_cat_id,
                                 results_path=out / "coco_instances_results.json")
    for iou_type in ("bbox", "segm"):
        print(f"{iou_type}: " + "  ".join(f"{k} {metrics[f'{iou_type}/{k}']:.2f}" for k in STAT_NAMES))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"results: {out / 'coco_instances_results.json'}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .predict import predict

    written = predict(args.images, run_dir=args.run, out_dir=args.out, score_thresh=args.score_thresh,
                      checkpoint=args.checkpoint, device=args.device)
    print(f"wrote {len(written)} images and {Path(args.out) / 'coco_results.json'}")
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from .synth import generate

    stats = generate(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                     image_size=args.image_size)
    print(f"wrote {stats.images} images, {stats.instances} instances ({stats.occluded} partly occluded, "
          f"extents {stats.min_extent:.0f}-{stats.max_extent:.0f} px) to {args.out}")
    print(f"train with: scratchdet train data.train.images={args.out}/train "
          f"data.train.annotations={args.out}/annotations/instances_train.json "
          f"data.val.images={args.out}/val data.val.annotations={args.out}/annotations/instances_val.json")
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    from .data import CocoDetection, pixel_stats

    ds = CocoDetection(images=args.images, annotations=args.annotations)
    mean, std = pixel_stats(ds, args.max_images)
    print(f"model.pixel_mean=[{','.join(map(str, mean))}] model.pixel_std=[{','.join(map(str, std))}]")
    return 0


def _presets(args: argparse.Namespace) -> int:
    for name in list_presets():
        print(name)
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.preset:
        import yaml

        from .config import to_dict

        print(yaml.safe_dump(to_dict(load_config(args.preset, args.overrides)), sort_keys=False), end="")
        return 0
    for key, default, help_ in describe():
        print(f"{key} = {default}\n    {help_}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scratchdet", description="Train Mask R-CNN from random initialization (or not) "
                                "on COCO-format data, and evaluate it with COCO AP.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model", description=(
        "Train Mask R-CNN. With no arguments: the embedded default (synthetic shapes, a small GroupNorm model "
        "from scratch, CPU, about 13 minutes on 2 cores). Examples:\n"
        "  scratchdet train\n"
        "  scratchdet train mask_rcnn_R50_FPN_GN_scratch_6x solver.ims_per_batch=2 --dry-run\n"
        "  scratchdet train data.train.images=DIR data.train.annotations=F.json "
        "data.val.images=DIR data.val.annotations=V.json\n"
        "  scratchdet train --resume runs/default_20260101-120000\n"
        "Options are listed by `scratchdet config`."), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(t, preset_help="a preset name (`scratchdet presets`) or a YAML file; default: default",
                       overrides_help="dotted key=value overrides, e.g. solver.base_lr=0.01",
                       out_help="run directory (default: runs/PRESET_TIMESTAMP)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest valid checkpoint")
    t.add_argument("--dry-run", action="store_true", help="build model, data and schedule, describe them, train nothing")
    t.set_defaults(func=_train)

    pt = sub.add_parser("pretrain", help="classification pre-training of the backbone (the pretrained arm)",
                        description=(
        "ImageNet-style pre-training of the detector's ResNet trunk on an ImageFolder (one sub-folder per class): "
        "SGD, cosine or step LR, random-resized crop and flip. Writes RUN_DIR/backbone_final.pth for "
        "`scratchdet train model.init=PATH`. Model options (model.depth, model.norm, ...) and solver options "
        "(solver.base_lr, solver.max_iter, solver.ims_per_batch) apply. Example:\n"
        "  scratchdet pretrain pretrain.images=imagenet/train model.depth=50 model.norm=GN solver.max_iter=450000"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(pt, preset_help="a preset name or YAML file (its model section is used)",
                       overrides_help="key=value overrides, e.g. pretrain.images=DIR",
                       out_help="run directory (default: runs/pretrain_TIMESTAMP)")
    pt.set_defaults(func=_pretrain)

    e = sub.add_parser("eval", help="COCO box and mask AP of a run, or of a results file", description=(
        "Evaluate with COCO AP (faster-coco-eval). Either a run's model on its validation set:\n"
        "  scratchdet eval --run RUN_DIR [key=value ...]\n"
        "or a COCO results file against ground truth (12 numbers per type):\n"
        "  scratchdet eval --annotations GT.json --results RES.json [RES2.json]"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("overrides", nargs="*", help="overrides of the run's config, e.g. data.val.annotations=F.json")
    e.add_argument("--run", help="run directory")
    e.add_argument("--checkpoint", help="a checkpoint file (default: the run's model_final.pth)")
    e.add_argument("--annotations", help="COCO ground-truth JSON (with --results)")
    e.add_argument("--results", nargs="+", help="COCO results JSON file(s)")
    e.add_argument("--iou-type", choices=("bbox", "segm"), help="default: segm if results have masks, else bbox")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=_eval)

    pr = sub.add_parser("predict", help="draw a run's detections on images", description=(
        "Write each image with masks, boxes, class names and scores drawn (PNG), and a COCO results JSON:\n"
        "  scratchdet predict img1.jpg img2.jpg --run RUN_DIR --out predictions/"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--run", required=True, help="run directory")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--checkpoint", help="a checkpoint file (default: the run's model_final.pth)")
    pr.add_argument("--score-thresh", type=float, default=0.5, help="draw detections scoring at least this")
    pr.add_argument("--device", default="auto")
    pr.set_defaults(func=_predict)

    d = sub.add_parser("data", help="datasets: synth, stats")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the synthetic shapes dataset (COCO format)", description=(
        "Write procedurally drawn shapes with exact masks as a COCO dataset: OUT/{train,val}/*.jpg and "
        "OUT/annotations/instances_{train,val}.json. Deterministic for a seed."))
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-train", type=int, default=600)
    s.add_argument("--num-val", type=int, default=100)
    s.add_argument("--image-size", type=int, default=256)
    s.set_defaults(func=_data_synth)
    st = dsub.add_parser("stats", help="RGB mean/std of a dataset, for model.pixel_mean/pixel_std", description=(
        "Compute per-channel pixel mean and std (0-255) of a COCO dataset's images, printed as overrides. "
        "Training from scratch on domain data should not inherit ImageNet's statistics by accident."))
    st.add_argument("--annotations", required=True, help="COCO JSON")
    st.add_argument("--images", required=True, help="image folder")
    st.add_argument("--max-images", type=int, default=0, help="use only the first N images (0: all)")
    st.set_defaults(func=_data_stats)

    ps = sub.add_parser("presets", help="list the shipped presets")
    ps.set_defaults(func=_presets)
    c = sub.add_parser("config", help="list every option with its default and meaning, or print a resolved preset")
    c.add_argument("preset", nargs="?", help="print this preset resolved (with overrides)")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileExistsError, FileNotFoundError) as e:
        print(f"scratchdet: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - our own clear errors, without a traceback
        from .data import DataError
        from .engine import NonFiniteLossError
        from .weights import WeightsError

        if isinstance(e, (DataError, NonFiniteLossError, WeightsError)):
            print(f"scratchdet: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
