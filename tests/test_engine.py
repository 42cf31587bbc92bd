import json

import pytest
import torch

from scratchdet.config import load_config
from scratchdet.engine import NonFiniteLossError, read_metrics, train
from scratchdet.evaluation import STAT_NAMES

from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH


def _cfg(*extra):
    return load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + list(extra))


def test_train_evaluate_synthetic_end_to_end(tmp_path):
    run = tmp_path / "run"
    result = train(_cfg("test.eval_period=3"), run, progress=False)
    for name in ("config.yaml", "env.json", "metrics.jsonl", "log.txt", "model_final.pth", "model_final.pth.sha256",
                 "model_0000003.pth", "final.json", "coco_instances_results.json"):
        assert (run / name).is_file(), name
    records = read_metrics(run)
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "bbox/AP" in r]
    assert [r["iteration"] for r in train_lines] == [2, 4, 6]
    assert [r["iteration"] for r in eval_lines] == [3, 6]
    for t in ("bbox", "segm"):
        assert all(f"{t}/{k}" in eval_lines[-1] for k in STAT_NAMES)
    assert all(k in train_lines[0] for k in ("lr", "images_per_sec", "loss_mask", "images_seen", "pixels_seen"))
    assert train_lines[-1]["images_seen"] == 12
    assert result["segm/AP"] == eval_lines[-1]["segm/AP"]
    state = torch.load(run / "model_final.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "iteration", "rng"} <= set(state)
    assert state["iteration"] == 6
    # The resolved config is in the run directory and rebuilds the same config.
    import yaml

    from scratchdet.config import from_dict

    assert from_dict(yaml.safe_load((run / "config.yaml").read_text())) == _cfg("test.eval_period=3")


def test_train_on_tiny_coco_writes_coco_category_ids(tiny_coco, tmp_path):
    cfg = load_config(None, TINY_MODEL + TINY_SOLVER + [
        f"data.train.images={tiny_coco / 'train2017'}",
        f"data.train.annotations={tiny_coco / 'annotations/instances_train2017.json'}",
        f"data.val.images={tiny_coco / 'val2017'}",
        f"data.val.annotations={tiny_coco / 'annotations/instances_val2017.json'}",
        "data.min_size_train=[128]", "data.max_size_train=192", "data.min_size_test=128", "data.max_size_test=192",
        "model.score_thresh_test=0.0", "solver.max_iter=4", "test.max_images=8", "test.ims_per_batch=2",
    ])
    result = train(cfg, tmp_path / "run", progress=False)
    assert 0 <= result["bbox/AP"] <= 100 and 0 <= result["segm/AP"] <= 100
    results = json.loads((tmp_path / "run/coco_instances_results.json").read_text())
    gt = json.loads((tiny_coco / "annotations/instances_val2017.json").read_text())
    coco_ids = {c["id"] for c in gt["categories"]}
    val_image_ids = {im["id"] for im in gt["images"]}
    assert results
    assert {r["category_id"] for r in results} <= coco_ids
    # COCO has no id 12 (its first gap): had labels been written unmapped, labels past 11 would give
    # ids outside COCO's set, which the subset check above would catch.
    assert max(r["category_id"] for r in results) > 12
    assert {r["image_id"] for r in results} <= val_image_ids
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    for r in results[:50]:  # masks pasted at the original image resolution
        assert tuple(r["segmentation"]["size"]) == sizes[r["image_id"]]


def test_non_finite_loss_stops_with_name_and_iteration(tmp_path):
    cfg = _cfg("solver.base_lr=1e12", "solver.warmup_iters=0", "solver.max_iter=30", "solver.checkpoint_period=1")
    with pytest.raises(NonFiniteLossError, match=r"non-finite (loss_\w+(, )?)+ at iteration \d+ \(lr "):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run/model_final.pth").exists()
    assert list((tmp_path / "run").glob("model_00*.pth"))  # the last good checkpoints stay


def test_run_directory_is_not_overwritten(tmp_path):
    cfg = _cfg("solver.max_iter=2")
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--force"):
        train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="finished"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    train(cfg, tmp_path / "run", force=True, progress=False)


def test_dry_run_describes_without_training(tmp_path):
    summary = train(load_config("mask_rcnn_R50_FPN_GN_scratch_6x"), tmp_path / "run", dry_run=True, progress=False)
    assert summary["parameters"] == summary["trainable_parameters"] > 40_000_000
    assert summary["norm_layers"] == ["FP32GroupNorm"]
    assert summary["steps"] == [480_000, 520_000] and summary["max_iter"] == 540_000
    assert not (tmp_path / "run").exists()


def test_bf16_autocast_trains_and_evaluates(tmp_path):
    result = train(_cfg("train.amp=bf16", "solver.max_iter=2"), tmp_path / "run", progress=False)
    assert 0 <= result["segm/AP"] <= 100


def test_skip_nonfinite_skips_a_bounded_number_of_steps(tmp_path):
    base = ["solver.base_lr=1e12", "solver.warmup_iters=0", "solver.max_iter=6", "solver.checkpoint_period=100"]
    train(_cfg(*base, "solver.skip_nonfinite=10"), tmp_path / "a", progress=False)
    skipped = [r for r in read_metrics(tmp_path / "a") if "skipped_step" in r]
    assert skipped and all("at iteration" in r["skipped_step"] for r in skipped)
    assert (tmp_path / "a/model_final.pth").exists()
    with pytest.raises(NonFiniteLossError):
        train(_cfg(*base, "solver.skip_nonfinite=1"), tmp_path / "b", progress=False)
    assert len([r for r in read_metrics(tmp_path / "b") if "skipped_step" in r]) == 1
