"""Pascal VOC (scratchdet/voc.py): COCO -> VOC -> VocDetection round trip on tiny_coco, VOC mAP against the
`object-detection-metrics` package (podm) and hand-computed cases, the VOC rows (V..) of docs/bad_input.md, several
roots as one dataset, the VOC presets, and Faster R-CNN trained and scored end to end (to-voc, train, eval)."""

import argparse
import dataclasses
import filecmp
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scratchdet.config import ConfigError, load_config
from scratchdet.data import CocoDetection, DataError, build_transforms
from scratchdet.voc import (
    VocDetection,
    VocRecord,
    coco_to_voc,
    evaluate_voc,
    load_voc,
    main_to_voc,
    read_class_names,
    voc_ap,
    voc_metrics,
    voc_sets,
)

from .conftest import TINY_COCO, TINY_MODEL, TINY_SOLVER

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"
SPLITS = ("train", "val")


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory) -> Path:
    """tiny_coco's train and val written into one VOC folder, as `scratchdet data to-voc` writes them."""
    if not (TINY_COCO / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"shared data not found at {TINY_COCO} (present in CI; see shared/data/README.md)")
    root = tmp_path_factory.mktemp("tiny_voc")
    for split in SPLITS:
        stats = coco_to_voc(TINY_COCO / f"annotations/instances_{split}2017.json", TINY_COCO / f"{split}2017", root,
                            split=split)
        assert (stats.images, stats.copied, stats.reencoded, stats.difficult) == (50, 50, 0, 5)
        assert not stats.report.skipped
    return root


def _coco(split: str, **kw) -> CocoDetection:
    return CocoDetection(images=TINY_COCO / f"{split}2017", annotations=TINY_COCO / f"annotations/instances_{split}2017.json",
                         **kw)


def _voc(root: Path, split: str, **kw) -> VocDetection:
    return VocDetection(root, split, class_names=read_class_names(root / "labels.txt"), **kw)


def _continuous(voc_boxes: np.ndarray) -> np.ndarray:
    """VOC 1-based inclusive pixels -> continuous 0-based xyxy (x0 = xmin - 1, x1 = xmax)."""
    return np.stack([voc_boxes[:, 0] - 1, voc_boxes[:, 1] - 1, voc_boxes[:, 2], voc_boxes[:, 3]], axis=1).reshape(-1, 4)


def _xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


# ---- tiny_coco -> VOC -> VocDetection -------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_tiny_coco_round_trip_gives_cocodetections_boxes_labels_and_images(tiny_voc, split):
    coco, voc = _coco(split), _voc(tiny_voc, split, keep_difficult=False)
    assert voc.class_names == coco.class_names and voc.num_classes == 80  # labels.txt keeps COCO's order
    assert voc.image_ids() == coco.image_ids()  # VOC ids are COCO's, zero-padded: 000139 -> 139
    assert voc.aspect_ratios() == coco.aspect_ratios()
    assert not voc.report.skipped
    for crec, vrec in zip(coco.records, voc.records):
        # The XML against the JSON itself, in float64: x0 = xmin - 1 = x, x1 = xmax = x + w.
        anns = [a for a in crec.anns if not a["iscrowd"]]
        np.testing.assert_allclose(_continuous(vrec.boxes[~vrec.difficult]),
                                   np.array([_xyxy(a["bbox"]) for a in anns]).reshape(-1, 4), rtol=0, atol=1e-6)
        assert filecmp.cmp(TINY_COCO / f"{split}2017" / crec.file_name, voc.image_path(vrec), shallow=False)
    for i in range(len(voc)):
        (cim, ct), (vim, vt) = coco[i], voc[i]
        assert torch.equal(cim, vim) and torch.equal(ct["labels"], vt["labels"])
        assert ct["image_id"] == vt["image_id"] and ct["orig_size"] == vt["orig_size"]
        assert vt["boxes"].dtype == torch.float32 and "masks" not in vt
        # float32 tensors: CocoDetection adds x + w in float32, VocDetection converts float64 values; an ulp apart.
        torch.testing.assert_close(vt["boxes"], ct["boxes"])


def test_augmented_samples_match_cocodetections_for_the_same_seed(tiny_voc):
    transforms = build_transforms(train=True, min_sizes=[160, 200, 240], max_size=320, flip_prob=0.5)
    coco, voc = _coco("train", transforms=transforms), _voc(tiny_voc, "train", transforms=transforms, keep_difficult=False)
    sides = set()
    for i in range(8):
        (cim, ct), (vim, vt) = coco[(i, 1000 + i)], voc[(i, 1000 + i)]
        assert torch.equal(cim, vim) and torch.equal(ct["labels"], vt["labels"]) and vt["seed"] == 1000 + i
        torch.testing.assert_close(vt["boxes"], ct["boxes"], rtol=0, atol=1e-3)
        sides.add(min(vim.shape[-2:]))
    assert len(sides) > 1  # the drawn sizes differ from sample to sample: the same draws from the same seeds


@pytest.mark.parametrize("split", SPLITS)
def test_crowd_regions_become_difficult_objects(tiny_voc, split):
    data = json.loads((TINY_COCO / f"annotations/instances_{split}2017.json").read_text())
    crowd = {(a["image_id"], tuple(_xyxy(a["bbox"]))) for a in data["annotations"] if a["iscrowd"]}
    voc = _voc(tiny_voc, split)  # keep_difficult=True (the default): difficult objects are trained on
    found = {(r.id, tuple(b)) for r in voc.records for b in _continuous(r.boxes[r.difficult]).tolist()}
    assert len(found) == len(crowd) == 5
    for (image_id, box), (cid, cbox) in zip(sorted(found), sorted(crowd)):
        assert image_id == cid and box == pytest.approx(cbox, abs=1e-6)
    i = next(k for k, r in enumerate(voc.records) if r.difficult.any())
    text = (tiny_voc / "Annotations" / f"{voc.records[i].name}.xml").read_text()
    assert "<difficult>1</difficult>" in text
    assert len(voc[i][1]["labels"]) == len(voc.records[i].labels)
    strict = _voc(tiny_voc, split, keep_difficult=False)
    assert len(strict[i][1]["labels"]) == int((~voc.records[i].difficult).sum())


def test_data_to_voc_command(tmp_path, capsys):
    if not (TINY_COCO / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"shared data not found at {TINY_COCO}")
    args = argparse.Namespace(annotations=str(TINY_COCO / "annotations/instances_val2017.json"),
                              images=str(TINY_COCO / "val2017"), out=str(tmp_path / "voc"), split="val")
    assert main_to_voc(args) == 0
    out = capsys.readouterr().out
    assert "wrote 50 images (50 JPEG copied, 0 re-encoded) and 382 objects (5 crowd regions as difficult)" in out
    assert (tmp_path / "voc/ImageSets/Main/val.txt").read_text().splitlines()[0] == "397133"
    assert read_class_names(tmp_path / "voc/labels.txt")[:3] == ["person", "bicycle", "car"]


def _coco_json(tmp_path: Path, images: list[dict], anns: list[dict], categories=None) -> Path:
    f = tmp_path / "ann.json"
    f.write_text(json.dumps({"images": images, "annotations": anns,
                             "categories": categories or [{"id": 3, "name": "traffic light"}]}))
    return f


def test_non_jpeg_images_are_reencoded_and_names_with_spaces_kept(tmp_path):
    (tmp_path / "img").mkdir()
    ramp = np.add.outer(np.arange(32), np.arange(40)).astype(np.uint8) * 3
    Image.fromarray(np.stack([ramp, ramp[::-1], 255 - ramp], -1)).save(tmp_path / "img" / "a.png")
    Image.new("L", (40, 32), 77).save(tmp_path / "img" / "b.png")
    f = _coco_json(tmp_path, [{"id": 1, "file_name": "a.png", "height": 32, "width": 40},
                              {"id": 2, "file_name": "b.png", "height": 32, "width": 40}],
                   [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2.5, 3, 10.25, 7], "iscrowd": 0,
                     "segmentation": [[2.5, 3, 12.75, 3, 12.75, 10]], "area": 1}])
    stats = coco_to_voc(f, tmp_path / "img", tmp_path / "voc", split="trainval")
    assert (stats.copied, stats.reencoded, stats.objects) == (0, 2, 1)
    with Image.open(tmp_path / "voc/JPEGImages/000001.jpg") as im:
        assert im.format == "JPEG" and im.size == (40, 32)
        assert np.abs(np.asarray(im, np.int16) - np.asarray(Image.open(tmp_path / "img/a.png"), np.int16)).mean() < 3
    xml = (tmp_path / "voc/Annotations/000001.xml").read_text()
    # VOC's 1-based inclusive pixels: xmin = x + 1, xmax = x + w; integers without a decimal point.
    assert "<name>traffic light</name>" in xml and "<xmin>3.5</xmin>" in xml and "<ymin>4</ymin>" in xml
    assert "<xmax>12.75</xmax>" in xml and "<ymax>10</ymax>" in xml and "<depth>3</depth>" in xml
    ds = VocDetection(tmp_path / "voc", "trainval")
    assert ds.class_names == ["traffic light"] and ds.image_ids() == [1, 2]
    assert ds[0][1]["boxes"].tolist() == [[2.5, 3.0, 12.75, 10.0]]
    assert tuple(ds[1][0][:, 0, 0].tolist()) == pytest.approx((77, 77, 77), abs=2)


def test_rerunning_a_conversion_is_allowed_and_overwrite_replaces(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 32)).save(tmp_path / "img" / "a.png")
    images = [{"id": 1, "file_name": "a.png", "height": 32, "width": 40}]
    ann = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 7], "iscrowd": 1,
           "segmentation": {"size": [32, 40], "counts": [1280]}, "area": 1}
    f = _coco_json(tmp_path, images, [ann])
    coco_to_voc(f, tmp_path / "img", tmp_path / "voc")
    coco_to_voc(f, tmp_path / "img", tmp_path / "voc")  # the same content: nothing refused
    f = _coco_json(tmp_path, images, [{**ann, "bbox": [1, 1, 5, 5]}])
    with pytest.raises(DataError, match="000001.xml exists with other content"):
        coco_to_voc(f, tmp_path / "img", tmp_path / "voc")
    coco_to_voc(f, tmp_path / "img", tmp_path / "voc", overwrite=True)
    assert "<xmin>2</xmin>" in (tmp_path / "voc/Annotations/000001.xml").read_text()


# ---- VOC mAP against podm -------------------------------------------------------------------------------------


def _jittered_results(data: dict, seed: int) -> list[dict]:
    """A fixed result set for a COCO file's non-crowd objects: jittered copies (IoU spread around 0.5), some
    objects missed, some detected twice, and random false positives; random scores (distinct with probability 1)."""
    rng = np.random.default_rng(seed)
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    cat_ids = sorted(c["id"] for c in data["categories"])
    results = []
    for a in data["annotations"]:
        if a["iscrowd"] or rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        for _ in range(1 + int(rng.random() < 0.15)):
            dw, dh = w * math.exp(rng.normal(0, 0.25)), h * math.exp(rng.normal(0, 0.25))
            results.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
                            "bbox": [x + rng.normal(0, 0.15) * w, y + rng.normal(0, 0.15) * h, dw, dh]})
    for image_id, (width, height) in sizes.items():
        for _ in range(int(rng.integers(0, 5))):
            w, h = rng.uniform(5, width / 2), rng.uniform(5, height / 2)
            results.append({"image_id": image_id, "category_id": int(rng.choice(cat_ids)), "score": float(rng.random()),
                            "bbox": [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]})
    return results


@pytest.mark.parametrize("use_07_metric", [True, False], ids=["11-point", "area"])
def test_voc_map_equals_podm_on_a_fixed_result_set(tiny_voc, use_07_metric):
    """Conventions, made the same on both sides:
    - podm: continuous boxes (xtl, ytl, xbr, ybr), IoU with plain areas, a match at IoU >= 0.5, no notion of
      difficult objects. It gets the COCO file's non-crowd boxes and the results as continuous xyxy.
    - scratchdet: VOC boxes read back from the converted XML, the devkit's + 1 areas on [x0 + 1, x1] (which is
      the continuous IoU), a match at IoU >= 0.5 (the devkit's), difficult objects ignored; given the records
      without their difficult (crowd) objects, since podm would count them as ordinary objects.
    - Both: detections by descending score, each taking its best-overlapping object of the class, duplicates
      false positives; the mean over classes with objects.
    - The 11-point thresholds: k * 0.1 in floating point on both sides (podm: np.linspace(0, 1, 11); scratchdet:
      np.arange(11) * 0.1, py-faster-rcnn's), so 0.30000000000000004, 0.6000000000000001, 0.7000000000000001; a
      class here reaches a recall of exactly 6/10, where k / 10 thresholds would give another 11-point AP.
    """
    podm = pytest.importorskip("podm.metrics", reason="the reference: pip install '.[test]' (object-detection-metrics)")
    data = json.loads((TINY_COCO / "annotations/instances_val2017.json").read_text())
    results = _jittered_results(data, seed=11)
    names = {c["id"]: c["name"] for c in data["categories"]}
    voc = _voc(tiny_voc, "val")
    records = [dataclasses.replace(r, boxes=r.boxes[~r.difficult], labels=r.labels[~r.difficult],
                                   difficult=r.difficult[~r.difficult]) for r in voc.records]
    label = {cid: k for k, cid in enumerate(sorted(names), start=1)}
    ours = [{**r, "category_id": label[r["category_id"]]} for r in results]
    stats, text = evaluate_voc(records, ours, use_07_metric=use_07_metric, class_names=voc.class_names)

    gold = [podm.BoundingBox.of_bbox(a["image_id"], names[a["category_id"]], *_xyxy(a["bbox"]))
            for a in data["annotations"] if not a["iscrowd"]]
    preds = [podm.BoundingBox.of_bbox(r["image_id"], names[r["category_id"]], *_xyxy(r["bbox"]), score=r["score"])
             for r in results]
    method = (podm.MethodAveragePrecision.ElevenPointsInterpolation if use_07_metric
              else podm.MethodAveragePrecision.AllPointsInterpolation)
    ref = podm.get_pascal_voc_metrics(gold, preds, iou_threshold=0.5, method=method)
    with_objects = {name: m for name, m in ref.items() if m.num_groundtruth > 0}
    assert any(np.isin(m.recall, [0.3, 0.6, 0.7]).any() for m in with_objects.values())  # the thresholds' rounding
    assert set(stats) == {"mAP"} | {f"AP/{name}" for name in with_objects}
    assert len(with_objects) > 30
    for name, m in with_objects.items():
        assert stats[f"AP/{name}"] / 100 == pytest.approx(m.ap, abs=1e-6), name
    assert stats["mAP"] / 100 == pytest.approx(podm.MetricPerClass.mAP(ref), abs=1e-6)
    assert 20 < stats["mAP"] < 90  # a result set with misses, duplicates and false positives: neither 0 nor 100
    assert f"mAP over {len(with_objects)} classes" in text


# ---- VOC mAP by hand ------------------------------------------------------------------------------------------


def _rec(image_id: int, boxes: list, difficult: list | None = None, label: int = 1) -> VocRecord:
    """A ground-truth image of one class; boxes in VOC coordinates (1-based inclusive pixels)."""
    return VocRecord(image_id, f"{image_id:06d}", 100, 100, np.array(boxes, np.float64).reshape(-1, 4),
                     np.full(len(boxes), label, np.int64), np.array(difficult or [False] * len(boxes), bool))


def _det(image_id: int, score: float, xyxy: list) -> dict:
    return {"image_id": image_id, "category_id": 1, "score": score, "bbox": xyxy}


def _ap(gt, dets, **kw) -> tuple[float, float]:
    """(11-point AP, area AP) as fractions."""
    return tuple(evaluate_voc(gt, dets, use_07_metric=m, box_format="xyxy", class_names=["cat"], **kw)[0]["mAP"] / 100
                 for m in (True, False))


def test_hand_computed_map_with_difficult_duplicates_and_an_iou_of_exactly_one_half():
    # VOC boxes (1-based inclusive): A = (1,1,10,10) and B = (21,21,40,40) in image 1 (continuous [0,10]^2 and
    # [20,40]^2), C = (1,1,20,20) and D = (51,51,60,60), difficult, in image 2; image 3 has no object. npos = 3.
    gt = [_rec(1, [[1, 1, 10, 10], [21, 21, 40, 40]]), _rec(2, [[1, 1, 20, 20], [51, 51, 60, 60]], [False, True]),
          _rec(3, [])]
    dets = [_det(1, 0.9, [0, 0, 10, 10]),    # A exactly: IoU 1                             -> TP
            _det(2, 0.8, [50, 50, 60, 60]),  # D, difficult                                 -> ignored
            _det(1, 0.7, [0, 0, 10, 10]),    # A again                                      -> FP (duplicate)
            _det(3, 0.6, [0, 0, 10, 10]),    # no object in image 3                         -> FP
            _det(2, 0.5, [0, 0, 20, 15]),    # C: 300 / 400 = 0.75                          -> TP
            _det(1, 0.4, [20, 20, 40, 30])]  # B: 200 / 400 = 0.5 exactly (the devkit's >=) -> TP
    # Without the ignored one: cumulative TP 1,1,1,2,3 and FP 0,1,2,2,2: recall 1/3,1/3,1/3,2/3,1, precision
    # 1,1/2,1/3,1/2,3/5. Area: the envelope is 1 up to recall 1/3, then 3/5: 1/3 * 1 + 2/3 * 3/5 = 11/15.
    # 11-point: t = 0, .1, .2, .3 -> 1; t = .4 ... 1 (7 thresholds) -> 3/5: (4 + 7 * 3/5) / 11 = 41/55.
    # (With the + 1 dropped from the box conversion, B's IoU would be 200/431 and the last detection a FP.)
    eleven, area = _ap(gt, dets)
    assert eleven == pytest.approx(41 / 55, abs=1e-12) and area == pytest.approx(11 / 15, abs=1e-12)
    # The same as continuous xywh results (evaluation.to_coco_results' format):
    xywh = [{**d, "bbox": [d["bbox"][0], d["bbox"][1], d["bbox"][2] - d["bbox"][0], d["bbox"][3] - d["bbox"][1]]}
            for d in dets]
    stats, _ = evaluate_voc(gt, xywh, use_07_metric=False, class_names=["cat"])
    assert stats == {"mAP": pytest.approx(1100 / 15), "AP/cat": pytest.approx(1100 / 15)}
    # Restricted to images 1 and 3 (as evaluate_coco's img_ids): npos 2; TP, FP, FP, TP -> recall 1/2,1/2,1/2,1,
    # precision 1,1/2,1/3,1/2: area 1/2 * 1 + 1/2 * 1/2 = 3/4; 11-point (6 * 1 + 5 * 1/2) / 11 = 17/22.
    eleven, area = _ap(gt, dets, image_ids=[1, 3])
    assert eleven == pytest.approx(17 / 22, abs=1e-12) and area == pytest.approx(3 / 4, abs=1e-12)


def test_a_detection_takes_its_best_overlap_even_if_already_matched():
    # E = [0,10]x[0,10], F = [0,10]x[1,11] (continuous). The second detection overlaps E by 96/104 and F by
    # 94/106: the devkit gives it to E, matched already, so it is a false positive (COCO's matching would take F).
    # Recall 1/2, 1/2; precision 1, 1/2: area 1/2; 11-point t = 0 ... .5 -> 1: 6/11.
    gt = [_rec(1, [[1, 1, 10, 10], [1, 2, 10, 11]])]
    eleven, area = _ap(gt, [_det(1, 0.9, [0, 0, 10, 10]), _det(1, 0.8, [0, 0.4, 10, 10.4])])
    assert eleven == pytest.approx(6 / 11, abs=1e-12) and area == pytest.approx(1 / 2, abs=1e-12)


def test_equal_scores_keep_the_input_order():
    # The devkit's MATLAB sort is stable. FP then TP: recall 0, 1, precision 0, 1/2: AP 1/2 both ways; TP first: 1.
    gt = [_rec(1, [[1, 1, 10, 10]])]
    fp, tp = _det(1, 0.5, [50, 50, 60, 60]), _det(1, 0.5, [0, 0, 10, 10])
    assert _ap(gt, [fp, tp]) == pytest.approx((1 / 2, 1 / 2), abs=1e-12)
    assert _ap(gt, [tp, fp]) == pytest.approx((1, 1), abs=1e-12)


def test_eleven_point_threshold_at_exactly_three_tenths():
    # Ten objects, three found, then a false positive: recall .1 .2 .3 .3, precision 1 1 1 3/4. The fourth
    # threshold is 0.1 * 3 = 0.30000000000000004 in floating point (np.arange(0, 1.1, 0.1): py-faster-rcnn's,
    # Detectron's, detectron2's), above a recall of exactly 3/10: thresholds 0, .1, .2 give 1, the rest 0: 3/11
    # (exact thresholds k / 10 would give 4/11). Area: 0.3 * 1 = 0.3.
    gt = [_rec(1, [[1 + 10 * k, 1, 10 + 10 * k, 10] for k in range(10)])]
    dets = [_det(1, 0.9 - 0.1 * k, [10 * k, 0, 10 + 10 * k, 10]) for k in range(3)] + [_det(1, 0.1, [0, 50, 9, 60])]
    eleven, area = _ap(gt, dets)
    assert eleven == pytest.approx(3 / 11, abs=1e-12) and area == pytest.approx(0.3, abs=1e-12)
    podm = pytest.importorskip("podm.metrics", reason="the reference: pip install '.[test]' (object-detection-metrics)")
    ref = podm.get_pascal_voc_metrics(
        [podm.BoundingBox.of_bbox(1, "cat", *_continuous(b[None])[0]) for b in gt[0].boxes],
        [podm.BoundingBox.of_bbox(1, "cat", *d["bbox"], score=d["score"]) for d in dets],
        method=podm.MethodAveragePrecision.ElevenPointsInterpolation)
    assert ref["cat"].ap == pytest.approx(3 / 11, abs=1e-12)


def test_voc_ap_by_hand():
    # Envelope over recall .2 .4 .4 .8: 1 up to .4, .75 up to .8, 0 after: area .2 + .2 + .4 * .75 = .7.
    # 11-point: t = 0 ... .4 -> 1 (5), t = .5 ... .8 -> .75 (4), t = .9, 1 -> 0: (5 + 3) / 11 = 8/11.
    recall, precision = [0.2, 0.4, 0.4, 0.8], [1, 1, 2 / 3, 0.75]
    assert voc_ap(recall, precision, use_07_metric=False) == pytest.approx(0.7, abs=1e-12)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(8 / 11, abs=1e-12)
    assert voc_ap([], [], use_07_metric=False) == voc_ap([], [], use_07_metric=True) == 0


def test_classes_without_objects_are_left_out_of_the_mean():
    gt = [_rec(1, [[1, 1, 10, 10]]), _rec(2, [[1, 1, 10, 10]], [True], label=2)]  # class 2: only a difficult object
    stats, text = evaluate_voc(gt, [_det(1, 0.9, [0, 0, 10, 10])], use_07_metric=False, box_format="xyxy",
                               class_names=["cat", "dog"])
    assert stats == {"mAP": 100.0, "AP/cat": 100.0}
    assert re.search(r"dog .* left out", text)


# ---- image ids and class names --------------------------------------------------------------------------------


def _write_voc(root: Path, names: list[str], xmls: dict[str, str] | None = None, split: str = "train") -> None:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    for k, n in enumerate(names):
        (root / "Annotations" / f"{n}.xml").write_text((xmls or {}).get(n, _xml(objects=[("ab"[k % 2], 5, 5, 20, 20, "0")])))
        Image.new("RGB", (40, 32), (120, 30, 200)).save(root / "JPEGImages" / f"{n}.jpg")


def _xml(*, width="40", height="32", objects=(("a", 5, 5, 20, 20, "0"),)) -> str:
    """A VOC annotation; an object is (name, xmin, ymin, xmax, ymax, difficult), None leaves the element out."""
    def el(tag, v):
        return "" if v is None else f"<{tag}>{v}</{tag}>"
    objs = "".join(f"<object>{el('name', o[0])}<bndbox>{el('xmin', o[1])}{el('ymin', o[2])}{el('xmax', o[3])}"
                   f"{el('ymax', o[4])}</bndbox>{el('difficult', o[5])}</object>" for o in objects)
    return f"<annotation><size>{el('width', width)}{el('height', height)}<depth>3</depth></size>{objs}</annotation>"


@pytest.mark.parametrize("names,ids", [(["000005", "000012"], [5, 12]), (["2008_000123", "2007_000005"],
                                                                         [2008000123, 2007000005]),
                                       (["cat_1", "000012"], [1, 2]), (["01", "1"], [1, 2])])
def test_image_ids_are_voc_numbers_where_all_are(tmp_path, names, ids):
    _write_voc(tmp_path, names)
    ds = VocDetection(tmp_path, "train")
    assert ds.image_ids() == ids and [r.name for r in ds.records] == names
    assert ds.class_names == ["a", "b"] and ds.label_to_cat_id == {1: 1, 2: 2}  # found in the split, sorted
    ds.keep(ids[1:])
    assert ds.image_ids() == ids[1:]


# ---- bad input: the V rows of docs/bad_input.md ---------------------------------------------------------------


def _set_xml(name: str = "000001", **kw):
    return lambda root: (root / "Annotations" / f"{name}.xml").write_text(_xml(**kw))


def _convert_case(anns_or_cats: str):
    """A COCO -> VOC conversion that must fail: two files with image id 1, or categories sharing a name."""
    def run(root: Path) -> None:
        (root / "img").mkdir()
        Image.new("RGB", (40, 32)).save(root / "img" / "a.png")
        images = [{"id": 1, "file_name": "a.png", "height": 32, "width": 40}]
        ann = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 7], "iscrowd": 1,
               "segmentation": {"size": [32, 40], "counts": [1280]}}
        if anns_or_cats == "collision":
            coco_to_voc(_coco_json(root, images, [ann]), root / "img", root / "voc", split="train")
            coco_to_voc(_coco_json(root, images, [{**ann, "bbox": [1, 1, 4, 4]}]), root / "img", root / "voc", split="val")
        elif anns_or_cats == "names":
            cats = [{"id": 3, "name": "cat"}, {"id": 4, "name": "cat"}]
            coco_to_voc(_coco_json(root, images, [ann], cats), root / "img", root / "voc")
        else:
            coco_to_voc(_coco_json(root, [{**images[0], "file_name": "nope.png"}], []), root / "img", root / "voc")
    return run


def _unlink(rel: str):
    return lambda root: (root / rel).unlink()


# (id, what, change to the two-image base layout, outcome, detail)
#   "error": DataError when VocDetection is built, matching detail; "read": DataError at ds[0]
#   "skip": builds; report counts one reason matching detail[0]; detail[1] objects left
#   "clean": builds, nothing counted; detail: check(ds)
#   "eval": evaluate_voc(ds, detail[0]) raises DataError matching detail[1]
#   "convert": the change itself (a conversion) raises DataError matching detail
VCASES = [
    ("V01", "image set file (ImageSets/Main/SPLIT.txt) missing", _unlink("ImageSets/Main/train.txt"), "error",
     "train.txt: image set file not found"),
    ("V02", "image listed twice in the image set file",
     lambda r: (r / "ImageSets/Main/train.txt").write_text("000001\n000002\n000001\n"), "error",
     "train.txt: image '000001' listed twice"),
    ("V03", "annotation file missing", _unlink("Annotations/000002.xml"), "error",
     "000002.xml: annotation file not found"),
    ("V04", "annotation file is not valid XML", lambda r: (r / "Annotations/000001.xml").write_text("<annotation><size>"),
     "error", "000001.xml: not valid XML"),
    ("V05", "size missing", _set_xml(width=None), "error", "000001.xml: missing or invalid size/width"),
    ("V06", "size not a positive integer (height 0)", _set_xml(height="0"), "error",
     "000001.xml: missing or invalid size/height"),
    ("V07", "object without a name", _set_xml(objects=[(None, 5, 5, 20, 20, "0")]), "error",
     "000001.xml: object\\[1\\]: missing <name>"),
    ("V08", "bndbox coordinate missing", _set_xml(objects=[("a", 5, 5, None, 20, "0")]), "error",
     "000001.xml: object\\[1\\] \\('a'\\): bndbox/xmax is missing or not a number"),
    ("V09", "bndbox coordinate not a number", _set_xml(objects=[("a", 5, "five", 20, 20, "0")]), "error",
     "000001.xml: object\\[1\\] \\('a'\\): bndbox/ymin is missing or not a number \\('five'\\)"),
    ("V10", "difficult neither 0 nor 1", _set_xml(objects=[("a", 5, 5, 20, 20, "yes")]), "error",
     "000001.xml: object\\[1\\] \\('a'\\): difficult must be 0 or 1"),
    ("V11", "class not among the given class_names",
     _set_xml(objects=[("a", 5, 5, 20, 20, "0"), ("zebra", 5, 5, 20, 20, "0")]), "error",
     "000001.xml: object\\[2\\]: class 'zebra' is not one of the 2 class_names"),
    ("V12", "image file missing", _unlink("JPEGImages/000002.jpg"), "error",
     "000002.jpg: image file not found \\(image '000002' of .*train.txt"),
    ("V13", "no images (empty image set file)", lambda r: (r / "ImageSets/Main/train.txt").write_text("\n"), "error",
     "train.txt: no images to use"),
    ("V14", "bndbox with NaN", _set_xml(objects=[("a", "nan", 5, 20, 20, "0")]), "skip", ("non-finite bndbox", 1)),
    ("V15", "xmax < xmin", _set_xml(objects=[("a", 20, 5, 19, 20, "0")]), "skip", ("empty bndbox", 1)),
    ("V16", "bndbox entirely outside the image", _set_xml(objects=[("a", 50, 5, 60, 20, "0")]), "skip",
     ("outside the image", 1)),
    ("V17", "bndbox partly outside the image (clipped)", _set_xml(objects=[("a", 5, 5, 60, 20, "0")]), "skip",
     ("clipped", 2)),
    ("V18", "bndbox with xmin 0 (a 0-based writer): clipped to 1", _set_xml(objects=[("a", 0, 5, 20, 20, "0")]),
     "skip", ("clipped", 2)),
    ("V19", "one-pixel bndbox (xmin = xmax)", _set_xml(objects=[("a", 7, 5, 7, 20, "0")]), "clean",
     lambda ds: ds[0][1]["boxes"].tolist() == [[6.0, 4.0, 7.0, 20.0]]),
    ("V20", "difficult missing", _set_xml(objects=[("a", 5, 5, 20, 20, None)]), "clean",
     lambda ds: not ds.records[0].difficult.any()),
    ("V21", "only difficult objects, training without them (filter_empty, keep_difficult=False)",
     _set_xml(objects=[("a", 5, 5, 20, 20, "1")]), "skip", ("without annotations", 1)),
    ("V22", "image size disagrees with the XML", lambda r: Image.new("RGB", (41, 32)).save(r / "JPEGImages/000001.jpg"),
     "read", "000001.jpg is 41x32 but image '000001' of .* says 40x32"),
    ("V23", "image file corrupt", lambda r: (r / "JPEGImages/000001.jpg").write_bytes(b"\x00garbage" * 50), "read",
     "000001.jpg: cannot read image '000001'"),
    ("V24", "evaluate_voc: detection for an image not in the ground truth", None, "eval",
     ([_det(99, 0.5, [0, 0, 4, 4])], "detection 0: image id 99 is not in the ground truth")),
    ("V25", "evaluate_voc: detection of an unknown category id", None, "eval",
     ([{**_det(1, 0.5, [0, 0, 4, 4]), "category_id": 7}], "detection 0: category id 7 is not one of")),
    ("V26", "evaluate_voc: detection box of negative width", None, "eval",
     ([_det(1, 0.5, [0, 0, -4, 4])], "detection 0: box with negative width")),
    ("V27", "evaluate_voc: non-finite score", None, "eval",
     ([_det(1, math.nan, [0, 0, 4, 4])], "detection 0: .*finite")),
    ("V28", "evaluate_voc: every object difficult", _set_xml(objects=[("a", 5, 5, 20, 20, "1")]), "eval",
     ([], "nothing to score")),
    ("V29", "to-voc: the same image id from two COCO files into one folder", _convert_case("collision"), "convert",
     "000001.xml exists with other content than image id 1"),
    ("V30", "to-voc: two categories share a name", _convert_case("names"), "convert",
     "categories 3 and 4 share the name 'cat'"),
    ("V31", "to-voc: image file missing", _convert_case("missing"), "convert",
     "nope.png: image file not found \\(image id 1 in .*ann.json\\)"),
    ("V32", "several VOC roots and a different number of image set names", None, "load",
     (lambda r: (f"{r},{r}", "train,train,train"), "3 image set names \\('train,train,train'\\) for 2 VOC roots")),
    ("V33", "the same image id in two VOC roots", lambda r: shutil.copytree(r, r.parent / "voc_in2"), "load",
     (lambda r: (f"{r},{r.parent / 'voc_in2'}", "train"),
      "voc_in2/ImageSets/Main/train.txt: image '000001' has image id 1, as image '000001' of .*voc_in/ImageSets/Main/"
      "train.txt has")),
    ("V34", "two VOC roots' labels.txt list different classes", lambda r: _two_label_files(r), "load",
     (lambda r: (f"{r},{r.parent / 'voc_in2'}", "train"), "voc_in2/labels.txt and .*voc_in/labels.txt list different")),
    ("V35", "format voc without an image set name (data.*.annotations empty)", None, "config",
     (["model.task=boxes", "data.train.format=voc", "data.train.images=voc"],
      "data.train.format: voc needs data.train.images .* and data.train.annotations")),
]


def _two_label_files(root: Path) -> None:
    (root / "labels.txt").write_text("a\nb\n")
    _write_voc(root.parent / "voc_in2", ["000003"])
    (root.parent / "voc_in2" / "labels.txt").write_text("b\na\n")


@pytest.mark.parametrize("case", VCASES, ids=[c[0] for c in VCASES])
def test_voc_catalogue_row(case, tmp_path):
    cid, _, change, outcome, detail = case
    root = tmp_path / "voc_in"
    _write_voc(root, ["000001", "000002"])
    if cid == "V28":  # both images: only difficult objects
        _set_xml("000002", objects=[("b", 5, 5, 20, 20, "1")])(root)
    if outcome == "convert":
        with pytest.raises(DataError, match=detail):
            change(tmp_path)
        return
    if change is not None:
        change(root)
    kw = {"class_names": ["a", "b"]} if cid == "V11" else {}
    if cid == "V21":
        kw = {"filter_empty": True, "keep_difficult": False}
    if outcome == "error":
        with pytest.raises(DataError, match=detail):
            VocDetection(root, "train", **kw)
    elif outcome == "read":
        ds = VocDetection(root, "train")
        with pytest.raises(DataError, match=detail):
            ds[0]
    elif outcome == "skip":
        ds = VocDetection(root, "train", **kw)
        reason, kept = detail
        counted = {r: n for r, n in ds.report.skipped.items() if reason in r}
        assert sum(counted.values()) == 1, ds.report.skipped
        assert sum(len(r.labels) for r in ds.records) == kept
        for i in range(len(ds)):  # what is kept trains: finite boxes inside the image with positive sides
            image, target = ds[i]
            b, (h, w) = target["boxes"], image.shape[-2:]
            assert torch.isfinite(b).all() and (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
            assert (b[:, 2:] > b[:, :2]).all() and len(b) == len(target["labels"])
    elif outcome == "clean":
        ds = VocDetection(root, "train")
        assert not ds.report.skipped and detail(ds)
    elif outcome == "eval":
        dets, message = detail
        with pytest.raises(DataError, match=message):
            evaluate_voc(VocDetection(root, "train"), dets, use_07_metric=False, box_format="xyxy")
    elif outcome == "load":
        sets, message = detail
        with pytest.raises(DataError, match=message):
            load_voc(*sets(root))
    elif outcome == "config":
        overrides, message = detail
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
    else:
        raise AssertionError(outcome)


def test_voc_catalogue_document_lists_every_row():
    rows = re.findall(r"^\| (V\d\d) \| (.*?) \|", DOC.read_text(), flags=re.M)
    assert [r[0] for r in rows] == [c[0] for c in VCASES]
    assert [r[1] for r in rows] == [c[1] for c in VCASES]


# ---- several roots as one dataset (data.*.images=ROOT1,ROOT2) ----------------------------------------------------


def test_two_image_sets_join_into_one_dataset(tiny_voc):
    # VOC07+12 style: one dataset from two image sets (here tiny_coco's train and val, both in one root).
    ds = load_voc(f"{tiny_voc},{tiny_voc}", "train,val")
    train, val = _voc(tiny_voc, "train"), _voc(tiny_voc, "val")
    assert ds.class_names == train.class_names  # labels.txt: COCO's order, not the sorted names found
    assert ds.image_ids() == train.image_ids() + val.image_ids() and len(ds) == 100
    for i, ref in ((0, train[0]), (len(ds) - 1, val[len(val) - 1])):
        image, target = ds[i]
        assert torch.equal(image, ref[0]) and torch.equal(target["labels"], ref[1]["labels"])


def test_roots_without_a_class_list_get_the_sorted_union_of_their_classes(tmp_path):
    _write_voc(tmp_path / "r1", ["000001"])  # class a
    _write_voc(tmp_path / "r2", ["000003"], xmls={"000003": _xml(objects=[("c", 5, 5, 20, 20, "0")])})
    Image.new("RGB", (40, 32), (0, 255, 0)).save(tmp_path / "r2/JPEGImages/000003.jpg")
    ds = load_voc(f"{tmp_path / 'r1'},{tmp_path / 'r2'}", "train")
    assert ds.class_names == ["a", "c"] and ds.num_classes == 2
    # r2 alone calls c label 1; in the joined dataset c is label 2, and its image is read from r2.
    assert [r.labels.tolist() for r in ds.records] == [[1], [2]]
    image, target = ds[1]
    assert target["labels"].tolist() == [2] and image[1].float().mean() > 200


# ---- the paper's VOC presets ------------------------------------------------------------------------------------


def _make_presets():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_presets", Path(__file__).parents[1] / "tools/make_presets.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


VOC_PRESETS = ["faster_rcnn_R101_FPN_GN_pretrained_18k_voc0712", "faster_rcnn_R101_FPN_GN_scratch_144k_voc0712"]


def test_voc_preset_files_match_their_generator_and_are_listed(capsys):
    from scratchdet.cli import main

    gen = _make_presets()
    assert sorted(gen.voc_expected()) == VOC_PRESETS
    for name, text in gen.voc_expected().items():
        assert (gen.CONFIGS / f"{name}.yaml").read_text() == text, name
    assert main(["presets"]) == 0
    assert set(VOC_PRESETS) <= set(capsys.readouterr().out.split())


@pytest.mark.parametrize("name", VOC_PRESETS)
def test_voc_presets_state_the_recipe_and_dry_run_offline(name, tmp_path, caplog):
    import logging

    from scratchdet.engine import train
    from scratchdet.schedule import resolve_schedule

    cfg = load_config(name)
    pretrained = "pretrained" in name
    assert (cfg.model.task, cfg.model.depth, cfg.model.norm, cfg.model.num_classes) == ("boxes", 101, "GN", 20)
    assert cfg.model.init == ("imagenet" if pretrained else "random")
    # The paper's PASCAL VOC paragraph (Sec. 5.2): trained on VOC07 trainval + VOC12 train, evaluated on VOC12 val
    # (VOC12 trainval would train on the evaluation images), with training-time scale augmentation.
    assert (cfg.data.train.format, cfg.data.train.images, cfg.data.train.annotations) == (
        "voc", "datasets/VOC2007,datasets/VOC2012", "trainval,train")
    assert voc_sets(cfg.data.train.images, cfg.data.train.annotations) == [
        (Path("datasets/VOC2007"), "trainval"), (Path("datasets/VOC2012"), "train")]
    assert (cfg.data.val.format, cfg.data.val.images, cfg.data.val.annotations) == ("voc", "datasets/VOC2012", "val")
    assert voc_sets(cfg.data.val.images, cfg.data.val.annotations) == [(Path("datasets/VOC2012"), "val")]
    assert cfg.data.min_size_train == [640, 672, 704, 736, 768, 800] and cfg.data.min_size_test == 800
    text = (_make_presets().CONFIGS / f"{name}.yaml").read_text()
    assert "ASSUMED" not in text and "VOC2012 val" in text and "scale augmentation" in text
    assert (cfg.solver.ims_per_batch, cfg.solver.base_lr, cfg.solver.reference_batch_size) == (16, 0.02, 16)
    s = resolve_schedule(cfg.solver)
    assert (s.max_iter, s.steps) == ((18_000, (12_000, 16_000)) if pretrained else (144_000, (96_000, 128_000)))
    with caplog.at_level(logging.INFO, logger="scratchdet"):
        summary = train(cfg, tmp_path / "run", dry_run=True, progress=False)
    assert summary["num_classes"] == 20 and summary["max_iter"] == s.max_iter
    assert "Faster R-CNN R101-FPN" in caplog.text and "not found" in caplog.text  # no VOC here: described only
    assert ("would be initialized from https://" in caplog.text) == pretrained  # described, not downloaded


# ---- Faster R-CNN trained and evaluated end to end ------------------------------------------------------------

TINY_SIZES = ["data.min_size_train=[128]", "data.max_size_train=192", "data.min_size_test=128",
              "data.max_size_test=192", "model.score_thresh_test=0.0", "solver.max_iter=4", "test.max_images=8",
              "test.ims_per_batch=2", "train.num_threads=1"]


def test_faster_rcnn_trains_on_voc_written_by_to_voc_and_reports_voc_map(tiny_coco, tmp_path, capsys):
    from scratchdet.analysis.report import build_report, is_detection_run
    from scratchdet.analysis.study import member_progress
    from scratchdet.cli import main
    from scratchdet.run import read_metrics

    voc, run = tmp_path / "voc", tmp_path / "run"
    for split in ("train", "val"):
        assert main(["data", "to-voc", "--annotations", str(tiny_coco / f"annotations/instances_{split}2017.json"),
                     "--images", str(tiny_coco / f"{split}2017"), "--out", str(voc), "--split", split]) == 0
    assert "wrote 50 images" in capsys.readouterr().out
    assert main(["train", *TINY_MODEL, *TINY_SOLVER, *TINY_SIZES, "model.task=boxes", "data.train.format=voc",
                 f"data.train.images={voc}", "data.train.annotations=train", "data.val.format=voc",
                 f"data.val.images={voc}", "data.val.annotations=val", "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "voc/mAP07" in out and "voc/mAP " in out and "bbox/AP" not in out
    records = read_metrics(run)
    losses = [r for r in records if "loss" in r]
    assert losses and all("loss_box_reg" in r and "loss_mask" not in r for r in losses)  # Faster R-CNN: no mask head
    evals = [r for r in records if "voc/mAP" in r]
    assert [r["iteration"] for r in evals] == [4] and not any("bbox/AP" in r for r in records)
    # The logged numbers are evaluate_voc's on the detections the run wrote, for the images it evaluated.
    dets = json.loads((run / "voc_detections.json").read_text())
    gt = load_voc(str(voc), "val", class_names=read_class_names(voc / "labels.txt"))
    evaluated = gt.image_ids()[:8]
    assert dets and {d["image_id"] for d in dets} <= set(evaluated)
    assert {d["category_id"] for d in dets} <= set(range(1, 81))  # labels: VOC has no category ids
    scores, _ = voc_metrics(gt, dets, evaluated)
    assert (evals[-1]["voc/mAP07"], evals[-1]["voc/mAP"]) == (scores["voc/mAP07"], scores["voc/mAP"])
    assert 0 <= scores["voc/mAP07"] <= 100 and 0 <= scores["voc/mAP"] <= 100
    tables = (run / "voc_eval.txt").read_text()
    assert "VOC 2007 11-point AP" in tables and "VOC area (VOC2010+) AP" in tables and "\nperson " in tables
    # `scratchdet eval --run` gives the same numbers from model_final.pth, and the per-class APs.
    assert main(["eval", "--run", str(run), "train.device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "VOC 2007 11-point AP" in out and "voc/mAP07" in out
    metrics = json.loads((run / "inference/metrics.json").read_text())
    assert metrics["voc/mAP07"] == evals[-1]["voc/mAP07"] and metrics["voc/mAP"] == evals[-1]["voc/mAP"]
    assert metrics["voc/AP/person"] == scores["voc/AP/person"]
    # Study status and reports read bbox/AP: a VOC run is still found and shown, without crashing.
    assert member_progress(run)["voc/mAP"] == evals[-1]["voc/mAP"]
    assert is_detection_run(run)
    build_report([run], tmp_path / "report")
    assert (tmp_path / "report/index.html").is_file()


def test_faster_rcnn_on_coco_json_reports_box_ap_only(tiny_coco, tmp_path):
    from scratchdet.engine import train

    cfg = load_config(None, TINY_MODEL + TINY_SOLVER + TINY_SIZES + [
        "model.task=boxes", f"data.train.images={tiny_coco / 'train2017'}",
        f"data.train.annotations={tiny_coco / 'annotations/instances_train2017.json'}",
        f"data.val.images={tiny_coco / 'val2017'}",
        f"data.val.annotations={tiny_coco / 'annotations/instances_val2017.json'}"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert 0 <= result["bbox/AP"] <= 100 and not any(k.startswith(("segm/", "voc/")) for k in result)
    dets = json.loads((tmp_path / "run/coco_instances_results.json").read_text())
    assert dets and not any("segmentation" in d for d in dets)


def test_to_voc_help():
    from scratchdet.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["data", "to-voc", "--help"])
    assert e.value.code == 0


class _Oracle(torch.nn.Module):
    """Predicts each image's ground truth (difficult objects too), scaled to the network input, in loader order."""

    def __init__(self, records: list[VocRecord]) -> None:
        super().__init__()
        self.records = iter(records)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for im in images:
            rec = next(self.records)
            h, w = im.shape[-2:]
            scale = torch.tensor([w / rec.width, h / rec.height] * 2)
            xyxy = torch.from_numpy(_continuous(rec.boxes)).float() * scale
            out.append({"boxes": xyxy, "labels": torch.from_numpy(rec.labels), "scores": torch.ones(len(xyxy))})
        return out


def test_evaluate_model_voc_scores_ground_truth_predictions_100(tiny_voc, tmp_path):
    # The wiring a model's detections go through before evaluate_voc: resized input -> original pixels ->
    # COCO-style results with category id = label -> VOC boxes. Ground truth predicted at the test size must
    # come back at IoU >= 0.95 (tiny_coco has objects of a few pixels: a pixel off anywhere would fail them).
    from scratchdet.evaluation import build_eval, evaluate_model_voc

    cfg = load_config(None, ["model.task=boxes", "data.val.format=voc", f"data.val.images={tiny_voc}",
                             "data.val.annotations=val", "data.min_size_test=96", "data.max_size_test=160",
                             "test.ims_per_batch=3", "dataloader.num_workers=0"])
    names = read_class_names(tiny_voc / "labels.txt")
    loader, gt = build_eval(cfg, (str(tiny_voc), "val"), class_names=names)
    assert isinstance(gt, VocDetection) and gt.class_names == names
    scores, tables = evaluate_model_voc(_Oracle(gt.records), loader, gt=gt, device=torch.device("cpu"),
                                        results_path=tmp_path / "dets.json")
    assert scores["voc/mAP07"] == 100 and scores["voc/mAP"] == 100 and "mAP over" in tables
    dets = json.loads((tmp_path / "dets.json").read_text())
    strict, _ = voc_metrics(gt, dets, iou=0.95)
    assert strict["voc/mAP"] == 100 and strict["voc/mAP07"] == 100
    # One class's detections dropped: that class scores 0, the others still 100.
    dropped, _ = voc_metrics(gt, [d for d in dets if d["category_id"] != 1])
    assert dropped["voc/AP/person"] == 0 and dropped["voc/AP/car"] == 100
