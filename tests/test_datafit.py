"""``datafit.fit_recipe`` on constructed box distributions (tiny, mixed, large objects), ``data.fit`` in a dry
run, and ``scratchdet data fit`` on the real nuclei set."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scratchdet.data import COVERAGE_IOU, TINY_BOX, ImageRecord, anchor_coverage
from scratchdet.datafit import BASE_SIDE, MAX_SIDE, fit_recipe

ROOT = Path(__file__).resolve().parents[1]
NUCLEI = ROOT.parent / "shared" / "data" / "dsb2018_nuclei"


def _records(sides, *, image=(256, 256), per_image=4, seed=0):
    """Images of ``image`` (w, h) with square-ish boxes whose sqrt(area) is drawn from ``sides``."""
    rng = np.random.default_rng(seed)
    draw = list(sides)
    recs = []
    for i in range(0, len(draw), per_image):
        anns = []
        for s in draw[i:i + per_image]:
            w = s * rng.uniform(0.8, 1.25)
            anns.append({"bbox": [0, 0, w, s * s / w], "iscrowd": 0})
        recs.append(ImageRecord(len(recs), f"{len(recs)}.jpg", image[1], image[0], anns))
    return recs


def _p10_at(recs, side):
    b = [np.sqrt(a["bbox"][2] * a["bbox"][3]) * side / min(r.width, r.height) for r in recs for a in r.anns]
    return float(np.percentile(b, 10))


def _coverage(recs, fit):
    side = fit.overrides["data.min_size_train"][0]
    wh = np.array([(a["bbox"][2], a["bbox"][3]) for r in recs for a in r.anns]) * side / 256
    return float(np.mean(anchor_coverage(wh, fit.overrides["model.anchor_sizes"]) >= COVERAGE_IOU))


def test_tiny_objects_enlarge_the_input_until_the_small_ones_reach_8_px():
    recs = _records(np.random.default_rng(1).uniform(4, 9, 400))  # nuclei-like: 4-9 px at 256 px
    fit = fit_recipe(recs)
    side = fit.overrides["data.min_size_train"][0]
    assert BASE_SIDE < side <= MAX_SIDE and side % 32 == 0
    assert _p10_at(recs, side) >= TINY_BOX > _p10_at(recs, side - 32)  # the smallest step that reaches 8 px
    assert fit.overrides["data.min_size_test"] == side and fit.overrides["data.max_size_train"] == side
    assert fit.overrides["model.anchor_sizes"][0] == 8 and fit.coverage == pytest.approx(_coverage(recs, fit))
    assert fit.coverage >= 0.8 and not [w for w in fit.warnings if "anchors cover" in w]
    # The length keeps the default's pixels: fewer iterations at the larger size, in proportion.
    assert fit.overrides["solver.max_iter"] == round(1500 * (256 / side) ** 2)
    assert any(f"input {side} px" in r and "under 8" in r for r in fit.reasons)


def test_objects_too_small_for_the_budget_stop_at_the_largest_input_with_a_warning():
    fit = fit_recipe(_records(np.full(200, 2.0)))
    assert fit.overrides["data.min_size_train"] == [MAX_SIDE]
    assert any(f"largest input allowed ({MAX_SIDE} px)" in w for w in fit.warnings)


def test_large_objects_keep_the_default_input_and_get_large_anchors():
    recs = _records(np.random.default_rng(2).uniform(60, 200, 400))
    fit = fit_recipe(recs)
    assert fit.overrides["data.min_size_train"] == [BASE_SIDE]
    anchors = fit.overrides["model.anchor_sizes"]
    assert anchors[0] >= 32 and anchors == [anchors[0] * 2 ** i for i in range(5)]
    assert fit.coverage >= 0.8 and fit.coverage == pytest.approx(_coverage(recs, fit))


def test_mixed_sizes_are_covered_from_the_smallest_up():
    sides = np.concatenate([np.random.default_rng(3).uniform(6, 12, 150), np.random.default_rng(4).uniform(30, 180, 250)])
    recs = _records(sides)
    fit = fit_recipe(recs)
    side = fit.overrides["data.min_size_train"][0]
    assert _p10_at(recs, side) >= TINY_BOX
    assert fit.overrides["model.anchor_sizes"][0] <= 16 and fit.coverage >= 0.8


def test_the_default_job_is_its_own_fit():
    # The synthetic set at 256 px needs no larger input, and its length is the default's: the rule is anchored there.
    sides = np.random.default_rng(5).uniform(19, 100, 2400)
    fit = fit_recipe(_records(sides, per_image=4))  # 600 images
    assert fit.overrides["data.min_size_train"] == [256] and fit.overrides["data.max_size_train"] == 256
    assert fit.overrides["solver.max_iter"] == 1500 and fit.overrides["solver.steps"] == [1250, 1425]
    assert not [w for w in fit.warnings if "passes" in w]  # 20 passes over 600 images


def test_few_passes_are_warned_about():
    fit = fit_recipe(_records(np.full(20000, 40.0), per_image=4))  # 5000 images: 1500 x 8 is 2.4 passes
    assert any("passes over the training set, under 20" in w for w in fit.warnings)


def test_wide_images_cap_the_longer_side_by_their_aspect_ratio():
    fit = fit_recipe(_records(np.full(40, 40.0), image=(512, 256)))
    assert fit.overrides["data.max_size_train"] == round(256 * 1333 / 800 / 32 + 0.5) * 32  # 2:1 capped at 1333/800


def _coco_folder(root, side):
    """8 grey 256x256 JPEGs, 6 boxes of ``side`` px each, as COCO."""
    (root / "img").mkdir(parents=True)
    images, anns = [], []
    for i in range(8):
        Image.new("RGB", (256, 256), (i * 20, 90, 90)).save(root / "img" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 256, "height": 256})
        for j in range(6):
            x = 10 + 40 * j
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, x, side, side],
                         "area": side * side, "iscrowd": 0,
                         "segmentation": [[x, x, x + side, x, x + side, x + side, x, x + side]]})
    ann = root / "train.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "dot"}]}))
    return ann


def test_data_fit_in_a_dry_run_says_what_it_chose_and_keeps_what_the_user_gave(tmp_path):
    ann = _coco_folder(tmp_path, 5)
    data = [f"data.train.images={tmp_path / 'img'}", f"data.train.annotations={ann}", "data.val.images=",
            "data.val.annotations=", "data.fit=true"]

    def dry(*extra):
        out = subprocess.run([sys.executable, "-m", "scratchdet", "train", "--dry-run", *data, *extra],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert out.returncode == 0, out.stderr + out.stdout
        return out.stdout + out.stderr

    text = dry()
    assert "data.fit: input 416 px (shorter side)" in text  # 5 px boxes: 8 px at 416 (5 x 416 / 256 = 8.1)
    assert "training shorter side 416" in text and "anchors: [8, 16, 32, 64, 128]" in text
    assert "cover 100.0% of them" in text  # the coverage line of the fitted anchors at the fitted size
    text = dry("data.min_size_train=[320]", "solver.max_iter=50", "solver.steps=[40]")
    # A size given in part keeps all four size keys (the anchors are fitted at 320), a length given in part the whole.
    assert ("kept as given data.min_size_train, data.max_size_train, data.min_size_test, data.max_size_test, "
            "solver.max_iter, solver.steps, solver.warmup_iters") in text
    assert "data.fit: input 320 px (shorter side), as given" in text
    assert "training shorter side 320" in text and "schedule: 50 iterations" in text


@pytest.mark.skipif(not NUCLEI.is_dir(), reason=f"{NUCLEI} (the shared nuclei set) is not on this machine")
def test_data_fit_on_the_nuclei_set_prints_size_anchors_and_coverage():
    out = subprocess.run([sys.executable, "-m", "scratchdet", "data", "fit", "--annotations",
                          str(NUCLEI / "annotations" / "instances_train.json"), "--images", str(NUCLEI / "images")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # 10% of the nuclei are under 6 px at the default 256 px: the fit enlarges the input and starts the anchors at 8.
    assert "input 384 px" in out.stdout and "anchors [8, 16, 32, 64, 128] px" in out.stdout
    assert "cover 93.4% of the boxes" in out.stdout
    assert "overrides: data.min_size_train=[384]" in out.stdout and "model.anchor_sizes=[8,16,32,64,128]" in out.stdout


def _fitted(preset, *overrides, sides=(5.0,) * 48, epochs=0):
    from types import SimpleNamespace

    from scratchdet.config import load_config
    from scratchdet.engine import apply_fit
    from scratchdet.schedule import resolve_schedule

    cfg = load_config(preset, ["data.train.images=", "data.train.annotations=", "data.val.images=",
                               "data.val.annotations=", *overrides])
    if epochs:  # as a preset would set it: not one of the keys the user gave
        cfg.solver.epochs = epochs
    train_set = SimpleNamespace(records=_records(np.asarray(sides)), transforms=None)
    apply_fit(cfg, train_set)
    return cfg, resolve_schedule(cfg.solver, len(train_set.records)), train_set


@pytest.mark.parametrize("preset, overrides, epochs", [
    ("default", (), 24),  # a preset's solver.epochs: it would stretch the fitted length to its epochs
    ("mask_rcnn_R50_FPN_GN_scratch_2x", ("solver.ims_per_batch=8",), 0),  # the Nx rule and linear scaling from 16
])
def test_data_fit_length_is_the_length_the_run_uses_whatever_the_preset(preset, overrides, epochs):
    from scratchdet.config import load_config

    base = load_config(preset, list(overrides)).solver
    cfg, sched, train_set = _fitted(preset, *overrides, epochs=epochs)
    fit = fit_recipe(train_set.records, ims_per_batch=cfg.solver.ims_per_batch)
    assert sched.max_iter == fit.overrides["solver.max_iter"] and list(sched.steps) == fit.overrides["solver.steps"]
    # The LR is the one the preset's own scaling gives at this batch.
    ref = base.reference_batch_size
    assert sched.base_lr == pytest.approx(base.base_lr * (base.ims_per_batch / ref if ref else 1))
    assert train_set.transforms is not None


def test_data_fit_with_a_given_input_size_fits_the_anchors_and_length_at_it():
    cfg, sched, _ = _fitted(None, "data.min_size_train=[640]", "solver.ims_per_batch=8")
    assert cfg.data.min_size_train == [640] and cfg.data.min_size_test == 256  # the size keys kept as they were
    # 5 px boxes at 640 px are 12.5 px: anchors from 16, not the 8 the fitted 416 px would give.
    assert cfg.model.anchor_sizes == [16, 32, 64, 128, 256]
    assert sched.max_iter == round(1500 * (256 / 640) ** 2)


def test_data_fit_edge_cases():
    assert fit_recipe(_records(np.full(40, 120.0)), max_side=200).overrides["data.min_size_train"] == [200]
    tiny_run = fit_recipe(_records(np.full(40, 40.0)), ims_per_batch=4096)  # 3 iterations: drops inside the run
    assert tiny_run.overrides["solver.max_iter"] == 3 and all(0 < s < 3 for s in tiny_run.overrides["solver.steps"])


def test_data_fit_command_reads_a_boxes_only_set_and_names_the_file_when_it_has_no_boxes(tmp_path, capsys):
    from scratchdet.cli import main

    ann = _coco_folder(tmp_path, 5)
    data = json.loads(ann.read_text())
    for a in data["annotations"]:
        del a["segmentation"]
    ann.write_text(json.dumps(data))
    assert main(["data", "fit", "--annotations", str(ann), "--images", str(tmp_path / "img")]) == 0
    assert "input 416 px" in capsys.readouterr().out
    data["annotations"] = []
    ann.write_text(json.dumps(data))
    assert main(["data", "fit", "--annotations", str(ann), "--images", str(tmp_path / "img")]) != 0
    err = capsys.readouterr().err
    assert str(ann) in err and "no boxes" in err and "Traceback" not in err
