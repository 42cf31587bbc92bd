"""Keypoint R-CNN (model.task keypoints): COCO person-keypoint reading and checking (the K rows of
docs/bad_input.md), keypoints through resize/flip/LSJ, the synthetic keypoints, keypoint AP against
pycocotools, the model and a short training run; and the LSJ transform (data.lsj) with its presets."""

import copy
import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from scratchdet.config import ConfigError, ModelConfig, load_config
from scratchdet.data import (
    CocoDetection,
    DataError,
    LargeScaleJitter,
    build_lsj_transforms,
    build_transforms,
    keypoint_flip_index,
)
from scratchdet.evaluation import KEYPOINT_STAT_NAMES, evaluate_coco_types, to_coco_results
from scratchdet.model import build_model, paste_detections
from scratchdet.schedule import resolve_schedule
from scratchdet.synth import KEYPOINT_NAMES, extreme_points, generate, write_keypoints

from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"
NAMES = ["nose", "left_eye", "right_eye"]


# ---- reading and checking ---------------------------------------------------------------------------------------

def _base():
    """One 40x32 image, one annotation with 3 keypoints (nose, left_eye, right_eye), all labelled."""
    images = [{"id": 1, "file_name": "a.png", "height": 32, "width": 40}]
    anns = [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 16], "area": 200.0, "iscrowd": 0,
             "keypoints": [10, 8, 2, 6, 6, 2, 14, 6, 1], "num_keypoints": 3}]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "face", "keypoints": list(NAMES)}]}


def _dataset(tmp_path, data, **kw):
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (40, 32), (90, 120, 30)).save(tmp_path / "img" / "a.png")
    f = tmp_path / "ann.json"
    f.write_text(json.dumps(data) if isinstance(data, dict) else data)
    return CocoDetection(images=tmp_path / "img", annotations=f, task="keypoints", **kw)


def test_tiny_coco_person_keypoints_are_read_with_their_flip_pairs(tiny_coco):
    ds = CocoDetection(images=tiny_coco / "train2017", annotations=tiny_coco / "annotations/person_keypoints_train2017.json",
                       task="keypoints")
    assert ds.num_keypoints == 17 and ds.class_names == ["person"]
    names = ds.keypoint_names
    flip = ds.keypoint_flip_index
    assert names[flip[names.index("left_eye")]] == "right_eye" and names[flip[names.index("right_ankle")]] == "left_ankle"
    assert flip[names.index("nose")] == names.index("nose")
    i = next(i for i, r in enumerate(ds.records) if any(a["num_keypoints"] for a in r.anns if not a["iscrowd"]))
    _, target = ds[i]
    anns = [a for a in ds.records[i].anns if not a["iscrowd"]]
    assert target["keypoints"].shape == (len(anns), 17, 3) and target["keypoints"].dtype == torch.float32
    assert "masks" not in target
    # COCO's pixel indices + 0.5 (continuous coordinates, as detectron2 reads them); unlabelled at (0, 0, 0).
    raw = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, 17, 3)
    labelled = raw[..., 2] > 0
    assert torch.equal(target["keypoints"][labelled][:, :2], raw[labelled][:, :2] + 0.5)
    assert torch.equal(target["keypoints"][~labelled], torch.zeros(int((~labelled).sum()), 3))


def test_resize_and_flip_move_keypoints_and_swap_left_and_right(tmp_path):
    # Shorter side 32 -> 64: x2; flip on a 80-px wide image: x -> 80 - x, left_eye and right_eye swapped.
    ds = _dataset(tmp_path, _base(), transforms=build_transforms(train=True, min_sizes=[64], max_size=1000,
                                                                flip_prob=1.0))
    image, target = ds[(0, 123)]
    assert image.shape[-2:] == (64, 80)
    kp = target["keypoints"][0]
    nose, left, right = [(10.5, 8.5, 2), (6.5, 6.5, 2), (14.5, 6.5, 1)]
    expect = [(80 - 2 * nose[0], 2 * nose[1], 2),  # the nose stays the nose
              (80 - 2 * right[0], 2 * right[1], 1),  # the new left eye is the old right eye, mirrored
              (80 - 2 * left[0], 2 * left[1], 2)]
    assert kp.tolist() == [list(map(float, e)) for e in expect]
    box = target["boxes"][0].tolist()
    assert box == [80 - 2 * 24, 8, 80 - 2 * 4, 40]  # the box moved the same way


def test_no_flip_keeps_the_order():
    assert keypoint_flip_index(["top", "right", "bottom", "left"]) == [0, 3, 2, 1]
    assert keypoint_flip_index(["nose", "left_eye", "right_eye", "eye_left", "eye_right"]) == [0, 2, 1, 4, 3]


def _mutate(fn):
    def build():
        d = _base()
        fn(d)
        return d
    return build


def _ann(**kw):
    return _mutate(lambda d: d["annotations"][0].update(kw))


def _kps(values, n=None):
    return _mutate(lambda d: d["annotations"][0].update(keypoints=values,
                                                         num_keypoints=n if n is not None else sum(
                                                             v > 0 for v in values[2::3] if isinstance(v, int))))


# (id, what, build, outcome, detail)
#   error: DataError at load matching detail (and naming the file);
#   repaired: loads, detail = (reason counted once, the keypoint marked unlabelled);
#   clean: loads, nothing counted, every keypoint as in the JSON.
KP_CASES = [
    ("K01", "no category has a 'keypoints' list (an instances file given to model.task keypoints)",
     _mutate(lambda d: d["categories"][0].pop("keypoints")), "error", "no category has a 'keypoints' list"),
    ("K02", "a category's 'keypoints' is not a list of names", _mutate(lambda d: d["categories"][0].update(keypoints=[1, 2])),
     "error", "non-empty list of distinct names"),
    ("K03", "a category's keypoint names repeat", _mutate(lambda d: d["categories"][0].update(keypoints=["a", "a"])),
     "error", "non-empty list of distinct names"),
    ("K04", "two categories with different keypoint lists",
     _mutate(lambda d: d["categories"].append({"id": 2, "name": "b", "keypoints": ["x"]})), "error",
     "categories 1 and 2 have different 'keypoints' lists"),
    ("K05", "a left_ keypoint without its right_ partner",
     _mutate(lambda d: d["categories"][0].update(keypoints=["nose", "left_eye", "eye"])), "error",
     "keypoint 'left_eye' has no 'right_eye'"),
    ("K06", "annotation without 'keypoints'", _mutate(lambda d: d["annotations"][0].pop("keypoints")), "error",
     r"annotation id 10 \(image id 1\): 'keypoints' must be a list of 3 x 3 numbers"),
    ("K07", "'keypoints' of the wrong length", _ann(keypoints=[10, 8, 2]), "error", "must be a list of 3 x 3 numbers"),
    ("K08", "'keypoints' holding a string", _ann(keypoints=[10, 8, 2, 6, "6", 2, 14, 6, 1]), "error",
     "must be a list of 3 x 3 numbers"),
    ("K09", "keypoint visibility other than 0, 1, 2", _kps([10, 8, 3, 6, 6, 2, 14, 6, 1], n=3), "error",
     r"annotation id 10 .*visibility must be 0, 1 or 2, got \[3\]"),
    ("K10", "'num_keypoints' missing (COCOeval would ignore the object)",
     _mutate(lambda d: d["annotations"][0].pop("num_keypoints")), "error",
     r"annotation id 10 .*'num_keypoints' must be the number of labelled keypoints \(3\), got None"),
    ("K11", "'num_keypoints' disagreeing with the visibility flags", _ann(num_keypoints=2), "error",
     r"'num_keypoints' must be the number of labelled keypoints \(3\), got 2"),
    ("K12", "'area' missing (OKS scales by it)", _mutate(lambda d: d["annotations"][0].pop("area")), "error",
     r"annotation id 10 .*'area' must be a finite number"),
    ("K13", "labelled keypoint outside the image", _kps([10, 8, 2, 60, 6, 2, 14, 6, 1]), "repaired",
     ("outside the image marked unlabelled", 1)),
    ("K14", "labelled keypoint with a NaN coordinate",
     '{"images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 40}], "categories": [{"id": 1, "name": "f", '
     '"keypoints": ["nose", "left_eye", "right_eye"]}], "annotations": [{"id": 10, "image_id": 1, "category_id": 1, '
     '"bbox": [4, 4, 20, 16], "area": 200, "iscrowd": 0, "num_keypoints": 3, "keypoints": [10, 8, 2, NaN, 6, 2, 14, 6, '
     '1]}]}', "repaired", ("non-finite coordinates", 1)),
    ("K15", "labelled keypoint with a number beyond float range (10**400)", _kps([10, 8, 2, 6, 6, 2, 10**400, 6, 1]),
     "repaired", ("non-finite coordinates", 2)),
    ("K16", "unlabelled keypoint (visibility 0) anywhere, even outside the image", _kps([10, 8, 2, 0, 0, 0, -50, 99, 0]),
     "clean", None),
]


@pytest.mark.parametrize("case", KP_CASES, ids=[c[0] for c in KP_CASES])
def test_keypoint_catalogue_row(case, tmp_path):
    cid, what, build, outcome, detail = case
    data = build() if callable(build) else build
    if outcome == "error":
        with pytest.raises(DataError, match=detail) as e:
            _dataset(tmp_path, data)
        assert "ann.json" in str(e.value)
        return
    ds = _dataset(tmp_path, data)
    _, target = ds[0]
    if outcome == "repaired":
        reason, k = detail
        counted = {r: n for r, n in ds.report.skipped.items() if reason in r}
        assert sum(counted.values()) == 1, ds.report.skipped
        assert target["keypoints"][0, k].tolist() == [0.0, 0.0, 0.0]
        assert target["keypoints"][0, 0].tolist() == [10.5, 8.5, 2.0]  # the others as they were
    else:
        assert not ds.report.skipped
        assert target["keypoints"][0].tolist() == [[10.5, 8.5, 2.0], [0, 0, 0], [0, 0, 0]]


def test_keypoint_catalogue_document_lists_every_row():
    rows = re.findall(r"^\| (K\d\d) \|", DOC.read_text(), flags=re.M)
    assert rows == [c[0] for c in KP_CASES]


def test_keypoints_with_other_transforms_are_refused(tmp_path):
    ds = _dataset(tmp_path, _base(), transforms=v2.RandomHorizontalFlip(1.0))
    with pytest.raises(ValueError, match="build_transforms"):
        ds[0]


# ---- LSJ ----------------------------------------------------------------------------------------------------------

def _reference_lsj(ds, key, size, scale, flip_prob):
    """The sample through torchvision's own Compose of the same transforms, every mask decoded at full size."""
    from .test_data import _reference_apply, _reference_raw

    index, seed = key
    image, target = _reference_raw(ds, index)
    ops = [LargeScaleJitter(size=size, scale=scale), v2.RandomHorizontalFlip(flip_prob), v2.SanitizeBoundingBoxes(min_size=1)]
    return _reference_apply(image, target, ops, seed)


@pytest.mark.parametrize("size,scale", [(160, (0.1, 2.0)), (96, (1.5, 2.0)), (300, (0.3, 0.5))])
def test_lsj_matches_torchvisions_ops_and_gives_a_square(tmp_path, size, scale):
    generate(tmp_path, seed=2, num_train=10, num_val=1, image_size=128)
    ds = CocoDetection(images=tmp_path / "train", annotations=tmp_path / "annotations/instances_train.json",
                       transforms=build_lsj_transforms(size=size, scale=scale, flip_prob=0.5))
    keys = [(i, int(s)) for i, s in enumerate(np.random.SeedSequence(7).generate_state(len(ds)))]
    flips = crops = 0
    for key in keys:
        image, target = ds[key]
        ref_image, ref = _reference_lsj(ds, key, size, scale, 0.5)
        assert image.shape == (3, size, size) and torch.equal(image, ref_image), key
        for k in ("boxes", "labels", "masks"):
            assert torch.equal(target[k], ref[k]), (key, k)
        flips += bool((image[:, :, 0] == 128).all() and not (image[:, :, -1] == 128).all())
        crops += len(target["labels"]) < len([a for a in ds.records[key[0]].anns if not a["iscrowd"]])
    if size == 96:
        assert crops, "the crop dropped instances somewhere"
    if size == 300:
        assert flips, "a flipped padded image has its padding on the left"


def test_lsj_moves_keypoints_with_the_crop(tmp_path):
    ds = _dataset(tmp_path, _base(), transforms=build_lsj_transforms(size=48, scale=(2.0, 2.0), flip_prob=0.0))
    hits = 0
    for seed in range(8):
        image, target = ds[(0, seed)]
        # 40x32 fits 96x96 at x2.4: 96x77, then a 48x48 window at the offset the sample's seed draws.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            top, left, ch, cw = LargeScaleJitter(size=48, scale=(2.0, 2.0)).make_params([ds.load_image(ds.records[0])])["crop"]
        assert image.shape == (3, 48, 48) and (ch, cw) == (48, 48)
        if not len(target["boxes"]):
            continue
        for (x, y, v), out in zip([(10.5, 8.5, 2), (6.5, 6.5, 2), (14.5, 6.5, 1)], target["keypoints"][0].tolist()):
            ex, ey = x * 96 / 40 - left, y * 77 / 32 - top
            inside = 0 <= ex <= 48 and 0 <= ey <= 48
            assert out == ([pytest.approx(ex, abs=1e-4), pytest.approx(ey, abs=1e-4), v] if inside else [0, 0, 0])
            hits += inside
    assert hits  # some keypoint stayed inside some crop


# ---- synthetic keypoints ---------------------------------------------------------------------------------------------

def test_extreme_points_of_a_rotated_square():
    mask = np.zeros((20, 20), bool)
    for y in range(20):
        for x in range(20):
            mask[y, x] = abs(x - 10) + abs(y - 9) <= 6  # a diamond: its tips are the extreme points
    assert extreme_points(mask) == [10, 3, 2, 16, 9, 2, 10, 15, 2, 4, 9, 2]
    flat = np.zeros((12, 14), bool)
    flat[2:9, 3:12] = True  # an upright rectangle: every extreme is a side; the middle of its pixels is taken
    assert extreme_points(flat) == [7, 2, 2, 11, 5, 2, 7, 8, 2, 3, 5, 2]


def test_synthetic_keypoints_load_and_lie_on_their_masks(tmp_path):
    generate(tmp_path, seed=0, num_train=6, num_val=2, image_size=96)
    write_keypoints(tmp_path)
    ds = CocoDetection(images=tmp_path / "train", annotations=tmp_path / "annotations/keypoints_train.json",
                       task="keypoints")
    assert ds.keypoint_names == list(KEYPOINT_NAMES) and ds.keypoint_flip_index == [0, 3, 2, 1]
    assert not ds.report.skipped
    masks = CocoDetection(images=tmp_path / "train", annotations=tmp_path / "annotations/keypoints_train.json")
    for i in range(len(ds)):
        _, t = ds[i]
        _, m = masks[i]
        assert (t["keypoints"][..., 2] == 2).all()
        xy = (t["keypoints"][..., :2] - 0.5).long()
        for n in range(len(xy)):
            assert all(m["masks"][n, y, x] for x, y in xy[n].tolist())


def test_keypoint_task_on_synthetic_data_needs_its_keypoints():
    with pytest.raises(ConfigError, match="data.synth.keypoints=true"):
        load_config(None, ["model.task=keypoints"])


# ---- evaluation -------------------------------------------------------------------------------------------------

def _fixed_results(gt: dict, seed: int = 0) -> list[dict]:
    """A fixed result set: each object's keypoints moved by noise of its size, some missed, false positives added."""
    rng = np.random.default_rng(seed)
    out = []
    for a in gt["annotations"]:
        if a.get("iscrowd") or rng.random() < 0.15:
            continue
        k = np.array(a["keypoints"], dtype=float).reshape(-1, 3)
        s = math.sqrt(max(a["area"], 1.0))
        k[:, :2] += rng.normal(0, rng.uniform(0.01, 0.2) * s, (len(k), 2))
        k[:, 2] = 1
        x, y, w, h = a["bbox"]
        box = [x + rng.normal(0, 2), y + rng.normal(0, 2), w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [round(v, 2) for v in box],
                    "keypoints": [round(float(v), 2) for v in k.reshape(-1)], "score": round(float(rng.random()), 4)})
        if rng.random() < 0.3:  # a false positive beside it
            fp = dict(out[-1], keypoints=[v + 40 if i % 3 != 2 else v for i, v in enumerate(out[-1]["keypoints"])],
                      score=round(float(rng.random()) * 0.5, 4))
            out.append(fp)
    return out


def _pycocotools_keypoint_stats(gt_path, results, sigmas=None):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, "keypoints")
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.array(sigmas)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_keypoint_ap_equals_pycocotools_on_tiny_coco(tiny_coco):
    gt_path = tiny_coco / "annotations/person_keypoints_val2017.json"
    results = _fixed_results(json.loads(gt_path.read_text()))
    assert len(results) > 20
    ours = evaluate_coco_types(gt_path, results, ("keypoints",))["keypoints"][0]
    ref = _pycocotools_keypoint_stats(gt_path, results)
    assert list(ours) == list(KEYPOINT_STAT_NAMES)
    for name, value in zip(KEYPOINT_STAT_NAMES, ref):
        assert ours[name] / 100 == pytest.approx(value, abs=1e-4), name
    assert 5 < ours["AP"] < 95  # a result set that tests something


def test_keypoint_ap_equals_pycocotools_with_the_synthetic_layout(tmp_path):
    generate(tmp_path, seed=0, num_train=1, num_val=12, image_size=128)
    write_keypoints(tmp_path)
    gt_path = tmp_path / "annotations/keypoints_val.json"
    results = _fixed_results(json.loads(gt_path.read_text()), seed=3)
    ours = evaluate_coco_types(gt_path, results, ("keypoints",))["keypoints"][0]
    ref = _pycocotools_keypoint_stats(gt_path, results, sigmas=[0.05] * 4)
    for name, value in zip(KEYPOINT_STAT_NAMES, ref):
        assert ours[name] / 100 == pytest.approx(value, abs=1e-4), name


def test_results_hold_coco_pixel_index_keypoints():
    out = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
           "keypoints": torch.tensor([[[5.5, 6.5, 1.0], [10.0, 20.0, 1.0]]])}
    res = to_coco_results(out, 7, {1: 3})
    assert res == [{"image_id": 7, "category_id": 3, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.9,
                    "keypoints": [5.0, 6.0, 1.0, 9.5, 19.5, 1.0]}]


def test_paste_detections_scales_keypoints_to_the_original_image():
    out = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 30.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
           "keypoints": torch.tensor([[[20.0, 15.0, 1.0]]]), "keypoints_scores": torch.tensor([[3.0]])}
    pasted = paste_detections(out, (100, 200), (50, 400))
    assert pasted["keypoints"].tolist() == [[[40.0, 7.5, 1.0]]]
    assert pasted["boxes"].tolist() == [[20.0, 5.0, 100.0, 15.0]]


# ---- the model, and training -------------------------------------------------------------------------------------

def test_keypoint_rcnn_has_gn_in_its_head_and_fp32_heatmaps():
    model = build_model(ModelConfig(depth=18, stem_channels=16, base_width=16, gn_groups=8, fpn_channels=32,
                                    box_head_conv_dim=32, box_head_fc_dim=64, task="keypoints", num_keypoints=5,
                                    keypoint_head_num_conv=3, keypoint_head_conv_dim=32), num_classes=1)
    head = model.roi_heads.keypoint_head
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(convs) == len(norms) == 3 and all(n.num_groups == 8 for n in norms)
    assert all(c.bias is None for c in convs)  # the norm's shift replaces the bias
    x = torch.randn(2, 32, 14, 14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        heat = model.roi_heads.keypoint_predictor(head(x))
    assert heat.shape == (2, 5, 56, 56) and heat.dtype == torch.float32
    # Under train.channels_last too, the logits are contiguous: torchvision's loss views them as [N * K, H * W].
    model.to(memory_format=torch.channels_last)
    heat = model.roi_heads.keypoint_predictor(head(x.to(memory_format=torch.channels_last)))
    assert heat.is_contiguous()
    heat.view(2 * 5, 56 * 56)
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 80) * 255])[0]
    assert out["keypoints"].shape[1:] == (5, 3)


def _kp_cfg(*extra):
    return load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + [
        "model.task=keypoints", "data.synth.keypoints=true", "model.keypoint_head_num_conv=2",
        "model.keypoint_head_conv_dim=32", *extra])


def test_keypoint_task_trains_and_evaluates_keypoint_ap(tmp_path):
    from scratchdet.engine import train
    from scratchdet.run import read_metrics

    run = tmp_path / "run"
    train(_kp_cfg("test.eval_period=3"), run, progress=False)
    records = read_metrics(run)
    losses = [r for r in records if "loss" in r]
    evals = [r for r in records if "keypoints/AP" in r]
    assert "loss_keypoint" in losses[0] and all(math.isfinite(r["loss_keypoint"]) for r in losses)
    assert [r["iteration"] for r in evals] == [3, 6]
    assert all(f"keypoints/{k}" in evals[-1] for k in KEYPOINT_STAT_NAMES) and "bbox/AP" in evals[-1]
    assert not any(k.startswith("segm/") for k in evals[-1])
    res = json.loads((run / "coco_instances_results.json").read_text())
    assert res and len(res[0]["keypoints"]) == 3 * 4


def test_keypoint_task_trains_on_tiny_coco_person_keypoints(tiny_coco, tmp_path):
    from scratchdet.engine import train
    from scratchdet.run import read_metrics

    cfg = load_config(None, TINY_MODEL + TINY_SOLVER + [
        "model.task=keypoints", "model.keypoint_head_num_conv=2", "model.keypoint_head_conv_dim=32",
        f"data.train.images={tiny_coco / 'train2017'}",
        f"data.train.annotations={tiny_coco / 'annotations/person_keypoints_train2017.json'}",
        f"data.val.images={tiny_coco / 'val2017'}",
        f"data.val.annotations={tiny_coco / 'annotations/person_keypoints_val2017.json'}",
        "data.min_size_train=[128]", "data.max_size_train=160", "data.min_size_test=128", "data.max_size_test=160",
        "solver.max_iter=2", "solver.steps=[1]", "solver.warmup_iters=1", "test.max_images=3"])
    train(cfg, tmp_path / "run", progress=False)
    final = [r for r in read_metrics(tmp_path / "run") if "keypoints/AP" in r]
    assert final and math.isfinite(final[-1]["keypoints/AP"])


def test_lsj_trains_a_mask_rcnn(tmp_path):
    from scratchdet.engine import train
    from scratchdet.run import read_metrics

    cfg = load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + [
        "data.lsj=true", "data.lsj_size=96", "data.lsj_scale=[0.5,1.5]", "solver.max_iter=2", "solver.steps=[1]",
        "solver.warmup_iters=1"])
    train(cfg, tmp_path / "run", progress=False)
    assert any("segm/AP" in r for r in read_metrics(tmp_path / "run"))


# ---- presets ----------------------------------------------------------------------------------------------------

def _generator():
    spec = importlib.util.spec_from_file_location("make_presets", Path(__file__).parents[1] / "tools/make_presets.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def test_keypoint_and_lsj_preset_files_match_their_generator():
    gen = _generator()
    expected = {**gen.keypoint_expected(), **gen.lsj_expected()}
    assert sorted(expected) == sorted(
        [f"keypoint_rcnn_R50_FPN_GN_{i}_{s}" for i in ("scratch", "pretrained") for s in ("2x", "3x")]
        + [f"mask_rcnn_R50_FPN_{n}_scratch_lsj_{e}ep" for n in ("GN", "SyncBN") for e in (100, 200, 400)])
    for name, text in expected.items():
        assert (gen.CONFIGS / f"{name}.yaml").read_text() == text, name


@pytest.mark.parametrize("epochs", [100, 200, 400])
def test_lsj_presets_state_detectron2s_recipe(epochs):
    for norm in ("GN", "SyncBN"):
        cfg = load_config(f"mask_rcnn_R50_FPN_{norm}_scratch_lsj_{epochs}ep")
        assert cfg.data.lsj and cfg.data.lsj_size == 1024 and cfg.data.lsj_scale == [0.1, 2.0]
        assert cfg.model.norm == norm and cfg.model.init == "random"
        s = resolve_schedule(cfg.solver)
        k = epochs // 100
        # 100 epochs of COCO's 118k images at 64 per batch; LR 0.1; drops at 163889 and 177546 (x2, x4).
        assert (s.max_iter, s.steps, s.base_lr) == (184_375 * k, (163_889 * k, 177_546 * k), pytest.approx(0.1))
        assert s.max_iter * 64 / 118_000 == pytest.approx(epochs, rel=0.001)
        assert cfg.solver.weight_decay == pytest.approx(4e-5)
        # detectron2's warmup_length=500 / train.max_iter is a fraction of the run (WarmupParamScheduler: "relative
        # length ... w.r.t the entire training"); its 200ep/400ep files keep it and multiply max_iter by 2 and 4.
        assert (cfg.solver.warmup_iters, cfg.solver.warmup_factor) == (500 * k, pytest.approx(0.067))


def test_keypoint_presets_state_their_recipe():
    # The paper's keypoint figure compares 2x and 3x; Detectron's keypoint baseline (e2e_keypoint_rcnn_R-50-FPN_1x.yaml)
    # trains with TRAIN.SCALES (640, 672, 704, 736, 768, 800), MAX_SIZE 1333, and tests at 800.
    for init in ("scratch", "pretrained"):
        for n in (2, 3):
            cfg = load_config(f"keypoint_rcnn_R50_FPN_GN_{init}_{n}x")
            assert cfg.model.task == "keypoints" and cfg.model.num_keypoints == 17 and cfg.model.num_classes == 1
            assert cfg.model.norm == "GN" and cfg.model.keypoint_head_num_conv == 8
            assert "person_keypoints_train2017" in cfg.data.train.annotations
            assert resolve_schedule(cfg.solver).max_iter == n * 90_000
            assert cfg.data.min_size_train == [640, 672, 704, 736, 768, 800] and cfg.data.max_size_train == 1333
            assert cfg.data.min_size_test == 800


@pytest.mark.parametrize("name", ["keypoint_rcnn_R50_FPN_GN_scratch_3x", "keypoint_rcnn_R50_FPN_GN_pretrained_2x",
                                  "mask_rcnn_R50_FPN_SyncBN_scratch_lsj_100ep", "mask_rcnn_R50_FPN_GN_scratch_lsj_400ep"])
def test_new_presets_dry_run_offline(name, tmp_path):
    from scratchdet.engine import train

    summary = train(load_config(name), tmp_path / "run", dry_run=True, progress=False)
    assert summary["parameters"] > 1_000_000


@pytest.mark.parametrize("names, index", [
    (["nose", "left_eye", "right_eye"], [0, 2, 1]),
    (["nose", "left-eye", "right-eye"], [0, 2, 1]),
    (["leftEye", "rightEye", "Tail"], [1, 0, 2]),
    (["LEFT_EAR", "RIGHT_EAR"], [1, 0]),
])
def test_flip_pairs_left_and_right_in_any_spelling_for_training_and_tta(names, index):
    # A name the training flip left unpaired would train every flipped image on the wrong side's heatmap.
    from scratchdet.data import keypoint_flip_index
    from scratchdet.tta import keypoint_flip_map

    assert keypoint_flip_index(names) == index
    assert keypoint_flip_map([{"id": 1, "keypoints": names}]) == index
