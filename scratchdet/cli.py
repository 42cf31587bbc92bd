"""The ``scratchdet`` command: train, eval, predict, data synth, data stats, data to-voc, presets, config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, describe, list_presets, load_config


def split_preset(args: argparse.Namespace) -> None:
    """Sort the positional words: ``key=value`` ones are overrides (in their order), the one
    other word is the preset (``train key=value PRESET`` works as ``train PRESET key=value``)."""
    words = ([args.preset] if args.preset is not None else []) + list(args.overrides)
    names = [w for w in words if "=" not in w]
    if len(names) > 1:
        raise ConfigError(f"more than one preset given ({', '.join(names)}); overrides are key=value")
    args.preset = names[0] if names else None
    args.overrides = [w for w in words if "=" in w]


def _train(args: argparse.Namespace) -> int:
    from .engine import train

    if args.resume:
        # The run's own resolved config, unless a preset is named; overrides apply on top.
        run_dir = Path(args.resume)
        cfg_file = run_dir / "config.yaml"
        if not cfg_file.is_file() and "TORCHELASTIC_RESTART_COUNT" not in os.environ:
            # A typo in the path would otherwise start a full default training in the wrong (or a new) folder.
            raise ConfigError(f"--resume {run_dir}: not a run directory (no config.yaml there); check the path, or "
                              "start a new run with --out")
        cfg = load_config(args.preset or (str(cfg_file) if cfg_file.exists() else None), args.overrides)
    else:
        if args.branch_from and not args.out:
            raise ConfigError("--branch-from needs --out: the branch's own run directory")
        cfg = load_config(args.preset, args.overrides)
        name = Path(args.preset).stem if args.preset else "default"
        run_dir = Path(args.out) if args.out else Path("runs") / f"{name}_{_run_stamp(cfg)}"
    result = train(cfg, run_dir, resume=bool(args.resume), force=args.force, dry_run=args.dry_run,
                   progress=not args.no_progress, keep_at=args.keep_at, branch_from=args.branch_from)
    from . import distributed as dist

    if not dist.is_main():
        return 0
    if args.dry_run:
        print(json.dumps(result, indent=1))
        print(f"dry run: model, data and schedule built; nothing trained (would write to {run_dir})")
        return 0
    from .evaluation import ap_line

    line = ap_line(result)
    # Logged (stdout and the run's log.txt), so log.txt ends with the run's outcome too.
    logging.getLogger("scratchdet").info("done: %s", line if line != "no AP" else "no validation set, no AP")
    print(f"run directory: {run_dir}")
    return 0


def _iterations(text: str) -> tuple[int, ...]:
    """``--keep-at 400,600``: positive iterations."""
    try:
        its = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"iterations separated by commas, e.g. 400,600 (got {text!r})") from None
    if not its or its[0] < 1:
        raise argparse.ArgumentTypeError(f"iterations of at least 1 (got {text!r})")
    return its


def _run_stamp(cfg: Any) -> str:
    """The default run directory's suffix, one for all ranks: torchrun's run id where it has one
    (stable across --max-restarts, so a restart finds its run), else rank 0's clock."""
    from . import distributed as dist

    if not dist.launched():
        return time.strftime("%Y%m%d-%H%M%S")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id not in ("", "none"):
        return run_id
    from .device import pick_device

    dist.init(pick_device(cfg.train.device), timeout_s=cfg.train.dist_timeout)
    return dist.broadcast(time.strftime("%Y%m%d-%H%M%S"))


def launch(nproc: int, argv: list[str]) -> int:
    """``scratchdet train --num-gpus N ...``: the same command under torchrun on this machine
    (``torch.distributed.run``, one process per GPU, or per CPU process group on a CPU)."""
    from torch.distributed.run import main as torchrun

    cmd = ["--standalone", f"--nproc-per-node={nproc}", "-m", "scratchdet", *argv]
    print("launching: torchrun " + " ".join(cmd), file=sys.stderr)
    try:
        torchrun(cmd)
    except Exception as e:  # noqa: BLE001 - torchrun's ChildFailedError has printed the failed rank's error
        print(f"scratchdet: error: {e.__class__.__name__}: a process failed (its error is above)", file=sys.stderr)
        return 1
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    if args.resume:
        # The run's own resolved config, unless a preset is named; overrides apply on top (as train --resume).
        run_dir = Path(args.resume)
        cfg_file = run_dir / "config.yaml"
        cfg = load_config(args.preset or (str(cfg_file) if cfg_file.exists() else None), args.overrides)
    else:
        cfg = load_config(args.preset, args.overrides)
        run_dir = Path(args.out) if args.out else Path("runs") / f"pretrain_{time.strftime('%Y%m%d-%H%M%S')}"
    out = pretrain(cfg, run_dir, resume=bool(args.resume), force=args.force, progress=not args.no_progress)
    print(f"backbone: {out}\nfine-tune with: scratchdet train model.init={out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_coco_types, load_gt

    if args.results:
        if not args.annotations:
            raise ConfigError("eval --results needs --annotations GT.json")
        # Ground truth and each results file are read once, however many files and types are scored.
        gt = load_gt(args.annotations)
        numbers: dict[str, dict[str, float]] = {}
        for res in args.results:
            try:
                scored = evaluate_coco_types(gt, res, args.iou_type)
            except ValueError as e:
                raise ConfigError(f"{res}: {e}") from e
            numbers[res] = {}
            for iou_type, (stats, text) in scored.items():
                print(f"{res}: type={iou_type}")
                print(text, end="")
                # 12 numbers for bbox and segm, 10 for keypoints (evaluation.KEYPOINT_STAT_NAMES)
                print(json.dumps({f"{iou_type}/{k}": round(v, 3) for k, v in stats.items()}))
                numbers[res].update({f"{iou_type}/{k}": v for k, v in stats.items()})
        if args.json:
            Path(args.json).write_text(json.dumps(numbers, indent=1))
        return 0
    if not args.run:
        raise ConfigError("eval needs --run RUN_DIR, or --annotations GT.json --results RES.json")
    from . import distributed as dist
    from .data import check_categories, resolve_datasets
    from .device import amp_dtype, pick_device, precision_name
    from .evaluation import COCO_RESULTS, TASK_IOU_TYPES, build_eval, evaluate_run
    from .run import load_run_model
    from .voc import VOC_MEANS, VOC_RESULTS

    device = pick_device(args.device)
    model, cfg, meta = load_run_model(args.run, args.checkpoint, device, overrides=args.overrides)
    dist.init(device, timeout_s=cfg.train.dist_timeout)  # under torchrun: each rank evaluates its shard
    # The run's own precision (train.amp), as its evaluations during training used: the same
    # weights give the same numbers.  `train.amp=off` on this command line evaluates in fp32.
    dtype = amp_dtype(cfg.train.amp, device)
    _, val = resolve_datasets(cfg.data)
    if val is None:
        raise ConfigError("the run has no validation set; give data.val.images=DIR data.val.annotations=FILE")
    label_to_cat_id = {int(k): int(v) for k, v in meta["label_to_cat_id"].items()}
    voc = cfg.data.val.format == "voc"
    if not voc:  # a VOC set is read with the run's class names instead (an unknown class is an error there)
        check_categories(label_to_cat_id, val[1], what="validation set")
    loader, gt = build_eval(cfg, val, rank=dist.rank(), world_size=dist.world_size(), class_names=meta["class_names"])
    out = Path(args.run) / "inference"
    if dist.is_main():
        out.mkdir(exist_ok=True)
        print(f"evaluating in {precision_name(dtype)} on {device}" +
              (f" x {dist.world_size()} processes" if dist.world_size() > 1 else ""))
    metrics, tables, _ = evaluate_run(model, loader, gt, device=device, dtype=dtype, out_dir=out,
                                      task=cfg.model.task, label_to_cat_id=label_to_cat_id, voc=voc)
    if not dist.is_main():
        return 0
    if voc:  # both VOC mAPs, per class and mean
        print(tables, end="")
        print("  ".join(f"{k} {metrics[k]:.2f}" for k in VOC_MEANS))
    for iou_type in () if voc else TASK_IOU_TYPES[cfg.model.task]:
        # Keypoint AP has no small-object bucket and other AR names (evaluation.KEYPOINT_STAT_NAMES).
        names = [k.split("/", 1)[1] for k in metrics if k.startswith(f"{iou_type}/")]
        print(f"{iou_type}: " + "  ".join(f"{k} {metrics[f'{iou_type}/{k}']:.2f}" for k in names))
    (out / "metrics.json").write_text(json.dumps({**metrics, "precision": precision_name(dtype)}, indent=1))
    print(f"results: {out / (VOC_RESULTS if voc else COCO_RESULTS)}")
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


def _data_fit(args: argparse.Namespace) -> int:
    from .data import CocoDetection
    from .datafit import fit_recipe

    ds = CocoDetection(images=args.images, annotations=args.annotations, task="boxes")  # boxes are what it reads
    try:
        fit = fit_recipe(ds.records, ims_per_batch=args.ims_per_batch, max_side=args.max_side)
    except ValueError as e:
        raise ConfigError(f"{args.annotations}: {e}") from None
    for reason in fit.reasons:
        print(f"- {reason}")
    for warning in fit.warnings:
        print(f"warning: {warning}")
    print(f"overrides: {fit.override_args()} solver.ims_per_batch={args.ims_per_batch}")
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    from .data import CocoDetection, pixel_stats

    ds = CocoDetection(images=args.images, annotations=args.annotations)
    mean, std = pixel_stats(ds, args.max_images)
    print(f"model.pixel_mean=[{','.join(map(str, mean))}] model.pixel_std=[{','.join(map(str, std))}]")
    return 0


def _data_to_voc(args: argparse.Namespace) -> int:
    from .voc import main_to_voc

    return main_to_voc(args)


def _data_synth_cls(args: argparse.Namespace) -> int:
    from .synth import generate_cls

    stats = generate_cls(args.out, seed=args.seed, per_class=args.per_class, size=args.size, classes=args.classes)
    print(f"wrote {stats.images} crops ({stats.per_class} per class, {stats.size}x{stats.size} px) from "
          f"{stats.source_images} synthetic scenes to {args.out}")
    print(f"pre-train with: scratchdet pretrain pretrain.images={args.out} pretrain.crop_size={args.size} "
          "--out runs/pretrain_synth")
    return 0


def _study(args: argparse.Namespace) -> int:
    from .analysis import study as st

    study = st.open_study(args.study, args.out)
    if args.status:
        print(st.format_status(study))
        return 0
    st.check_configs(study)  # every member's config loads before anything runs or is written out
    if args.emit or args.dry_run:
        if args.emit:
            st.save_spec(study)  # so `--status` and `report` work on the directory the emitted jobs fill
            world = args.nproc * (args.nodes if args.emit == "slurm" else 1)
            for problem in st.indivisible_batches(study, world=world):
                print(f"scratchdet: warning: {problem}; set solver.ims_per_batch or --nproc", file=sys.stderr)
        if args.emit == "torchrun":
            print(st.emit_torchrun(study, nproc=args.nproc), end="")
        elif args.emit == "slurm":
            for name, text in st.emit_slurm(study, nproc=args.nproc, nodes=args.nodes).items():
                (study.root / name).write_text(text)
                print(f"# ---- {study.root / name}\n{text}", end="")
        else:
            for m in study.members:
                print(f"{m.name}: {' '.join(m.overrides) or '(base only)'}")
            print(f"dry run: {len(study.members)} runs of {study.base} into {study.root}; nothing trained")
        return 0
    results = st.run_study(study, progress=not args.no_progress)
    print(st.format_status(study))
    failed = [n for n, s in results.items() if s == "failed"]
    if failed:
        print(f"scratchdet: {len(failed)} run(s) failed: {', '.join(failed)}; errors in {study.root / st.STATE_FILE}; "
              f"`scratchdet study {study.root}` retries them and skips finished runs", file=sys.stderr)
        return 1
    print(f"report with: scratchdet report {study.root} --out {study.root / 'report'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .analysis.report import build_report, table_text

    if not args.runs and not args.compare:
        raise ConfigError("report: give run or study directories, or --compare A B")
    result = build_report(args.runs, args.out, compare=tuple(args.compare) if args.compare else None,
                          pretrain_offset=args.pretrain_offset, title=args.title, margin=args.margin, ap=args.ap,
                          notes=Path(args.notes).read_text(encoding="utf-8") if args.notes else "")
    shown = result["tables"][:3] if args.compare else result["tables"][:1]
    for t in shown:
        print(table_text(t) + "\n")
    print(f"report: {result['written'][0]} ({len(result['runs'])} runs); figures, SVGs and tables/*.csv in {args.out}")
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
    # What `scratchdet train` with no argument uses: the default preset over the built-in defaults.
    from .config import DEFAULT_PRESET, to_dict

    used = to_dict(load_config(None, args.overrides))
    print(f"# every option, with the value `scratchdet train` uses (preset {DEFAULT_PRESET!r}); "
          "'built-in' where the preset changes it")
    for key, default, help_ in describe():
        value: Any = used
        for part in key.split("."):
            value = value[part]
        note = f"  (built-in: {default})" if repr(value) != default else ""
        print(f"{key} = {value!r}{note}\n    {help_}")
    return 0


TRAIN_DOC = (
    "Train Mask R-CNN. With no arguments: the embedded default (synthetic shapes, a small GroupNorm model "
    "from scratch, CPU, 10-13 minutes measured on 2 cores with native bf16, up to about 18 on a machine a "
    "third slower; 18 measured in fp32, about 24 a third slower). Examples:\n"
    "  scratchdet train\n"
    "  scratchdet train mask_rcnn_R50_FPN_GN_scratch_6x solver.ims_per_batch=2 --dry-run\n"
    "  scratchdet train data.train.images=DIR data.train.annotations=F.json "
    "data.val.images=DIR data.val.annotations=V.json\n"
    "  scratchdet train model.task=boxes data.train.format=voc data.train.images=VOC2007,VOC2012 "
    "data.train.annotations=trainval,train data.val.format=voc data.val.images=VOC2012 data.val.annotations=val\n"
    "  scratchdet train --resume runs/default_20260101-120000\n"
    "Options are listed by `scratchdet config`.")

PRETRAIN_DOC = (
    "ImageNet-style pre-training of the detector's ResNet trunk on an ImageFolder (one sub-folder per class): "
    "SGD, cosine or step LR, random-resized crop and flip. Writes RUN_DIR/backbone_final.pth for "
    "`scratchdet train model.init=PATH` (model.init=RUN_DIR works too), periodic checkpoints "
    "model_NNNNNNN.pth and model_final.pth (the whole classifier and its solver; it marks the run finished). "
    "SIGTERM/SIGINT checkpoint and stop; --resume continues exactly. Examples:\n"
    "  scratchdet pretrain pretrain.images=imagenet/train model.depth=50 model.norm=GN solver.max_iter=450000\n"
    "  scratchdet pretrain --resume runs/pretrain_20260101-120000\n"
    "Options used:\n"
    "  pretrain.*            images, crop_size, lr_schedule (cosine, or step: solver.steps and solver.gamma)\n"
    "  model.*               the trunk: depth, groups, width_per_group, stem_channels, base_width, norm, gn_groups,\n"
    "                        zero_init_residual, stride_in_1x1, pixel_mean, pixel_std; num_classes must be 0 or\n"
    "                        the number of class folders\n"
    "  solver.*              base_lr, momentum, weight_decay, weight_decay_norm, weight_decay_bias, ims_per_batch,\n"
    "                        max_iter or epochs (passes over the folder), steps, gamma, warmup_iters, warmup_factor,\n"
    "                        reference_batch_size (linear scaling), skip_nonfinite, checkpoint_period,\n"
    "                        keep_checkpoints\n"
    "  train.*               seed, device, amp, channels_last, deterministic, log_period, num_threads\n"
    "  dataloader.num_workers, data.flip_prob\n"
    "Refused with an error: solver.schedule (the paper's Nx rule is for detection: use solver.max_iter or\n"
    "  solver.epochs), model.init other than random (pre-training starts from random weights; so model.freeze_at).\n"
    "Not used (detection only): the detector's heads (model.fpn_channels, model.anchor_*, model.rpn_*,\n"
    "  model.roi_*, model.box_head_*, model.mask_head_*, model.*_test, model.detections_per_image), data.* other\n"
    "  than data.flip_prob (data.train/val/synth, sizes, filter_empty, subset), dataloader.aspect_ratio_grouping,\n"
    "  test.*, train.dist_timeout (pretrain runs in one process).")

EVAL_DOC = (
    "Evaluate with COCO AP (faster-coco-eval), or VOC mAP@0.5 (11-point and area) where the run's validation set\n"
    "is VOC (data.val.format=voc). Either a run's model on its validation set:\n"
    "  scratchdet eval --run RUN_DIR [key=value ...]\n"
    "or COCO results files against ground truth (12 numbers per type; a file with boxes and masks is\n"
    "scored for both, from one reading of each file):\n"
    "  scratchdet eval --annotations GT.json --results RES.json [RES2.json] [--iou-type bbox segm]")

PREDICT_DOC = (
    "Write each image with masks, boxes, class names and scores drawn (PNG), and a COCO results JSON:\n"
    "  scratchdet predict img1.jpg img2.jpg --run RUN_DIR --out predictions/")

SYNTH_DOC = (
    "Write procedurally drawn shapes with exact masks as a COCO dataset: OUT/{train,val}/*.jpg and "
    "OUT/annotations/instances_{train,val}.json. Deterministic for a seed.")

STATS_DOC = (
    "Compute per-channel pixel mean and std (0-255) of a COCO dataset's images, printed as overrides. "
    "Training from scratch on domain data should not inherit ImageNet's statistics by accident.")

FIT_DOC = (
    "Choose the input size, the anchors and the length from a training set's annotations (no image opened), "
    "with the reason for each, printed as overrides for scratchdet train; data.fit=true applies the same rules "
    "at the start of a run. The rules: scratchdet/datafit.py.")

SYNTH_CLS_DOC = (
    "Write OUT/<class>/NNNNNN.png: square crops around the synthetic shapes (with their context: clutter, "
    "occluders, background), one sub-folder per shape class, the same number per class; drawn from scenes "
    "the detection dataset does not contain. Deterministic for a seed. The pretrained arm for the synthetic "
    "data: scratchdet pretrain pretrain.images=OUT pretrain.crop_size=SIZE --out RUN.")

TO_VOC_DOC = (
    "Write a COCO instances dataset as Pascal VOC: OUT/Annotations/<id>.xml (1-based inclusive pixel boxes; "
    "crowd regions as difficult objects), OUT/JPEGImages/<id>.jpg (JPEGs copied, others re-encoded), "
    "OUT/ImageSets/Main/SPLIT.txt and OUT/labels.txt (class names in COCO's order). Several splits may go "
    "into one OUT. Example (tiny_coco's train and val, then Faster R-CNN on them with VOC mAP):\n"
    "  scratchdet data to-voc --annotations A/instances_train2017.json --images train2017 --out voc "
    "--split train\n"
    "  scratchdet data to-voc --annotations A/instances_val2017.json --images val2017 --out voc --split val\n"
    "  scratchdet train model.task=boxes data.train.format=voc data.train.images=voc "
    "data.train.annotations=train data.val.format=voc data.val.images=voc data.val.annotations=val")

STUDY_DOC = (
    "A study is a base preset plus a grid over config keys, expanded into named runs under one directory "
    "(the paper's Table 1 is model.init x solver.schedule). Runs go one after another in this process: a "
    "finished run is skipped, a started one resumes, a failed one is recorded in STUDY_DIR/study.json and the "
    "study goes on. Examples:\n"
    "  scratchdet study studies/mini_rethink.yaml --out runs/mini_rethink\n"
    "  scratchdet study runs/mini_rethink                 # resume\n"
    "  scratchdet study runs/mini_rethink --status\n"
    "  scratchdet study STUDY.yaml --out /shared/study --emit slurm --nproc 8\n"
    "The study file (a comment per key):\n"
    "  base: default               # preset name or YAML file (relative to the study file)\n"
    "  overrides: [k=v, ...]       # applied to every run and to the pretrain stage\n"
    "  grid: {model.init: [random, \"@pretrain\"], solver.schedule: [...], data.subset: [...]}\n"
    "                              # the runs: the product, in order; @pretrain = the pretrain stage's backbone\n"
    "  name: \"{model.init}_{solver.schedule}\"   # optional run-name template ({key}: its grid value)\n"
    "  pretrain:                   # optional, run first: `scratchdet pretrain` for the pretrained arm\n"
    "    synth_cls: {seed: 0, per_class: 300, size: 64}   # optional: generate its ImageFolder\n"
    "    overrides: [k=v, ...]     # after the study's overrides\n"
    "Each run writes RUN/tensorboard: `tensorboard --logdir STUDY_DIR` shows every run.")

REPORT_DOC = (
    "Draw the paper's figures and tables from runs (or studies: folders of runs), reading only each run's "
    "metrics.jsonl and config.yaml: AP vs iteration, box and mask (random init solid, pretrained dashed, LR "
    "drops dotted; Fig. 1), images/instances/pixels seen with pre-training (Fig. 2), the 12 COCO numbers per "
    "run, the schedule x init pivot (Table 1) and the data size x init pivot (Sec. 5.2), random init minus "
    "pretrained; each run's data, model, batch and schedule, and a caption per figure. Writes "
    "OUT/index.html (self-contained, offline), PNG and SVG figures and tables/*.csv. Examples:\n"
    "  scratchdet report runs/mini_rethink --out runs/mini_rethink/report\n"
    "  scratchdet report --compare runs/a runs/b --out cmp/")
def _arg(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One row of a command's table: ``add_argument(*flags, **kwargs)``."""
    return flags, kwargs


def _run_args(*, preset_help: str, overrides_help: str, out_help: str) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """The positional preset and overrides and the run-directory options that train and pretrain share."""
    return [_arg("preset", nargs="?", help=preset_help), _arg("overrides", nargs="*", help=overrides_help),
            _arg("--out", help=out_help),
            _arg("--force", action="store_true", help="overwrite a run directory that already holds a run"),
            _arg("--no-progress", action="store_true", help="no progress bar")]


# One table per command: its help line, description, arguments and handler (plain dicts read by
# build_parser; "commands" nests a command's own subcommands).  "raw": keep the description's lines.
COMMANDS: dict[str, dict[str, Any]] = {
    "train": {"help": "train a model", "description": TRAIN_DOC, "raw": True, "func": _train, "args": [
        *_run_args(preset_help="a preset name (`scratchdet presets`) or a YAML file; default: default",
                   overrides_help="dotted key=value overrides, e.g. solver.base_lr=0.01",
                   out_help="run directory (default: runs/PRESET_TIMESTAMP)"),
        _arg("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest valid checkpoint"),
        _arg("--dry-run", action="store_true", help="build model, data and schedule, describe them, train nothing"),
        _arg("--keep-at", type=_iterations, default=(), metavar="IT,IT",
             help="schedule branching, the trunk: also save the state at these iterations (branch_NNNNNNN.pth, "
                  "never pruned), the first LR drops of the shorter lengths that branch from this run"),
        _arg("--branch-from", metavar="TRUNK_DIR",
             help="schedule branching, a branch: start this run (--out) from TRUNK_DIR's state at this run's "
                  "first LR drop (the trunk trained with --keep-at it) and train only the tail; resumes it "
                  "once started. The trunk's config must differ only in the schedule's length"),
        _arg("--num-gpus", type=int, default=0, metavar="N",
             help="train with N processes on this machine (torchrun with DDP; one per GPU, or N CPU processes "
                  "with gloo where there is no GPU); for several machines run torchrun yourself (docs/distributed.md)")]},
    "pretrain": {"help": "classification pre-training of the backbone (the pretrained arm)",
                 "description": PRETRAIN_DOC, "raw": True, "func": _pretrain, "args": [
        *_run_args(preset_help="a preset name or YAML file (the options above apply; others are refused or "
                               "not used, as listed)",
                   overrides_help="key=value overrides, e.g. pretrain.images=DIR",
                   out_help="run directory (default: runs/pretrain_TIMESTAMP)"),
        _arg("--resume", metavar="RUN_DIR",
             help="continue the pretrain run in RUN_DIR from its newest valid checkpoint, with its config.yaml")]},
    "eval": {"help": "COCO box and mask AP of a run, or of a results file", "description": EVAL_DOC, "raw": True,
             "func": _eval, "args": [
        _arg("overrides", nargs="*", help="overrides of the run's config, e.g. data.val.annotations=F.json"),
        # --run-dir: under torchrun, whose own parser reads a bare --run as its --run-path option.
        _arg("--run", "--run-dir", dest="run", help="run directory (--run-dir under torchrun)"),
        _arg("--checkpoint", help="a checkpoint file (default: the run's model_final.pth)"),
        _arg("--annotations", help="COCO ground-truth JSON (with --results)"),
        _arg("--results", nargs="+", help="COCO results JSON file(s)"),
        _arg("--iou-type", nargs="+", choices=("bbox", "segm", "keypoints"),
             help="iou type(s) to score; default: every type the results carry (bbox for boxes, segm for masks, "
                  "keypoints for keypoints)"),
        _arg("--json", metavar="FILE", help="with --results: also write every number, unrounded (percent), to "
                                            "FILE as {RES.json: {'bbox/AP': ...}}"),
        _arg("--device", default="auto")]},
    "predict": {"help": "draw a run's detections on images", "description": PREDICT_DOC, "raw": True,
                "func": _predict, "args": [
        _arg("images", nargs="+", help="image files or folders"),
        _arg("--run", "--run-dir", dest="run", required=True, help="run directory"),
        _arg("--out", required=True, help="output folder"),
        _arg("--checkpoint", help="a checkpoint file (default: the run's model_final.pth)"),
        _arg("--score-thresh", type=float, default=0.5, help="draw detections scoring at least this"),
        _arg("--device", default="auto")]},
    "data": {"help": "datasets: synth, stats, fit, synth-cls, to-voc", "commands": {
        "synth": {"help": "write the synthetic shapes dataset (COCO format)", "description": SYNTH_DOC,
                  "func": _data_synth, "args": [
            _arg("--out", required=True, help="output folder"), _arg("--seed", type=int, default=0),
            _arg("--num-train", type=int, default=600), _arg("--num-val", type=int, default=100),
            _arg("--image-size", type=int, default=256)]},
        "stats": {"help": "RGB mean/std of a dataset, for model.pixel_mean/pixel_std", "description": STATS_DOC,
                  "func": _data_stats, "args": [
            _arg("--annotations", required=True, help="COCO JSON"),
            _arg("--images", required=True, help="image folder"),
            _arg("--max-images", type=int, default=0, help="use only the first N images (0: all)")]},
        "fit": {"help": "size the input, anchors and length from a training set, printed as overrides",
                "description": FIT_DOC, "func": _data_fit, "args": [
            _arg("--annotations", required=True, help="COCO instances JSON of the training set"),
            _arg("--images", required=True, help="its image folder (file_name in the JSON is relative to it)"),
            _arg("--ims-per-batch", type=int, default=8, help="images per step the length is counted in"),
            _arg("--max-side", type=int, default=512, help="the largest shorter side allowed (the CPU budget)")]},
        "synth-cls": {"help": "write a classification ImageFolder of synthetic shape crops (for pretrain)",
                      "description": SYNTH_CLS_DOC, "func": _data_synth_cls, "args": [
            _arg("--out", required=True, help="output folder (an ImageFolder)"), _arg("--seed", type=int, default=0),
            _arg("--per-class", type=int, default=300, help="crops per class"),
            _arg("--size", type=int, default=64, help="side of the square crops, in pixels"),
            _arg("--classes", choices=("target", "other"), default="target",
                 help="target: the detection set's six shapes (in-domain labelled data); other: eight shapes the "
                      "detection set never holds (a stand-in for ImageNet: other classes, the same kind of pixels)")]},
        "to-voc": {"help": "write a COCO dataset in Pascal VOC layout (boxes only)", "description": TO_VOC_DOC,
                   "raw": True, "func": _data_to_voc, "args": [
            _arg("--annotations", required=True, help="COCO instances JSON"),
            _arg("--images", required=True, help="image folder (file_name in the JSON is relative to it)"),
            _arg("--out", required=True, help="VOC root to write (created; may already hold other splits)"),
            _arg("--split", default="train", help="image set name: writes OUT/ImageSets/Main/SPLIT.txt"),
            _arg("--overwrite", action="store_true",
                 help="replace annotation files that exist with other content (else an error)")]}}},
    "study": {"help": "run a grid of runs (a study), write it out as torchrun/SLURM commands, or show its progress",
              "description": STUDY_DOC, "raw": True, "func": _study, "args": [
        _arg("study", help="a study YAML file, or a study directory (to resume it or show its status)"),
        _arg("--out", help="study directory (default: runs/<study file name>)"),
        _arg("--status", action="store_true", help="print a table of the runs: status, progress, latest AP"),
        _arg("--emit", choices=("torchrun", "slurm"),
             help="print the commands instead of running: one torchrun command per run, or sbatch scripts "
                  "(a job array with srun torchrun; also written into the study directory)"),
        _arg("--nproc", type=int, default=8, help="with --emit: processes (GPUs) per node (default 8)"),
        _arg("--nodes", type=int, default=1, help="with --emit slurm: nodes per run (default 1)"),
        _arg("--dry-run", action="store_true", help="list the runs and their overrides; check every config"),
        _arg("--no-progress", action="store_true", help="no progress bars")]},
    "report": {"help": "figures, tables and an HTML page from runs' metrics.jsonl and config.yaml",
               "description": REPORT_DOC, "raw": True, "func": _report, "args": [
        _arg("runs", nargs="*", help="run directories, or study directories (folders of runs)"),
        _arg("--out", required=True, help="output folder"),
        _arg("--compare", nargs=2, metavar=("A", "B"),
             help="a two-run side-by-side (run directories, or names of runs given): config differences, "
                  "the 24 numbers with B-A, what each saw, their curves"),
        _arg("--pretrain-offset", action="store_true",
             help="draw the pretrained runs' pre-training (its images in the run's iterations) as a grey "
                  "band on an axis of its own, left of each AP panel"),
        _arg("--title", default="scratchdet report", help="the page's title"),
        _arg("--margin", type=float, default=None,
             help="equivalence margin in AP points for the catch-up verdicts (default 1: the paper's Table 1 reads "
                  "a 1.3-point gap as not caught up and 0.2-0.3 as matching); an interval inside +-margin is "
                  "'equivalent', one that holds 0 but reaches past it 'inconclusive'"),
        _arg("--notes", metavar="FILE",
             help="a text file shown first on the page under 'Notes' (paragraphs split at blank lines): what the "
                  "runs' records cannot hold, e.g. a study's measured wall time and the caveats a README states"),
        _arg("--ap", choices=("final", "best"), default="final",
             help="which evaluation of each run the findings read: the final one, or the best one by box AP, every "
                  "type and the images seen read there (for presets that say 'report each arm's best evaluation'; "
                  "intervals only where the best is the final)")]},
    "presets": {"help": "list the shipped presets", "func": _presets, "args": []},
    "config": {"help": "list every option with its default and meaning, or print a resolved preset",
               "func": _config, "args": [_arg("preset", nargs="?", help="print this preset resolved (with overrides)"),
                                         _arg("overrides", nargs="*")]},
}


def _add_commands(sub: Any, table: dict[str, dict[str, Any]]) -> None:
    """Add each command of ``table`` (and, nested, its own subcommands) to the subparsers ``sub``."""
    for name, spec in table.items():
        extra = {"description": spec["description"]} if "description" in spec else {}
        if spec.get("raw"):
            extra["formatter_class"] = argparse.RawDescriptionHelpFormatter
        p = sub.add_parser(name, help=spec["help"], **extra)
        if "commands" in spec:
            _add_commands(p.add_subparsers(dest=f"{name}_command", required=True), spec["commands"])
            continue
        for flags, kwargs in spec["args"]:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(func=spec["func"])


def build_parser() -> argparse.ArgumentParser:
    """The CLI, from the command tables above."""
    p = argparse.ArgumentParser(prog="scratchdet", description="Train Mask R-CNN from random initialization (or not) "
                                "on COCO-format data, and evaluate it with COCO AP.")
    _add_commands(p.add_subparsers(dest="command", required=True), COMMANDS)
    return p



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``key=value`` overrides may stand anywhere among the options
    (``train PRESET --out DIR key=value``), and keep their order."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and hasattr(args, "overrides"):
        for token in extras:
            if not token.startswith("-"):
                args.overrides.append(token)  # split_preset tells a late preset from overrides
            else:
                parser.error(f"unrecognized argument: {token}")
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if hasattr(args, "preset") and hasattr(args, "overrides"):
        try:
            split_preset(args)
        except ConfigError as e:
            parser.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # Under torchrun: a failing rank's traceback goes into torchrun's error report.  Imported
        # only then: `scratchdet --help` should not wait for torch.
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_main)(argv)
    return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if getattr(args, "num_gpus", 0) > 1 and not os.environ.get("WORLD_SIZE"):
        i = argv.index("--num-gpus") if "--num-gpus" in argv else None
        rest = argv[:i] + argv[i + 2:] if i is not None else [a for a in argv if not a.startswith("--num-gpus=")]
        return launch(args.num_gpus, rest)
    try:
        code = args.func(args)
        # Every rank got here: leave together, then close the group.  A group left to the
        # interpreter's exit can abort in gloo's threads ("terminate called without an active
        # exception") after the work is done, and torchrun would report the run as failed.
        dist = sys.modules.get("scratchdet.distributed")  # imported by the commands that use it
        if dist is not None:
            dist.shutdown()
        return code
    except BrokenPipeError:
        # `scratchdet config | head`: the reader left; no traceback, and no second error at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by a closed pipe
    except (ConfigError, FileExistsError, FileNotFoundError) as e:
        print(f"scratchdet: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - our own clear errors, without a traceback
        from .data import DataError
        from .run import NonFiniteLossError
        from .weights import WeightsError

        if isinstance(e, (DataError, NonFiniteLossError, WeightsError)):
            print(f"scratchdet: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
