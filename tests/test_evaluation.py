import json
import re

import pytest

from scratchdet.cli import main
from scratchdet.evaluation import STAT_NAMES, evaluate_coco


def _reference(cocoapi):
    """The 24 numbers cocoapi prints, by type, from val2014_fake_eval_res.txt."""
    ref, current = {}, None
    for line in (cocoapi / "val2014_fake_eval_res.txt").read_text().splitlines():
        if line.startswith("type="):
            current = line.split("=")[1].strip()
            ref[current] = []
        elif "Average" in line and current in ("bbox", "segm"):
            ref[current].append(float(line.rsplit("=", 1)[1]))
    return ref


def test_cocoapi_cross_check_through_the_cli(cocoapi, capsys):
    ref = _reference(cocoapi)
    assert len(ref["bbox"]) == len(ref["segm"]) == 12
    gt = cocoapi / "instances_val2014_100.json"
    for iou_type in ("bbox", "segm"):
        res = cocoapi / f"instances_val2014_fake{iou_type}100_results.json"
        assert main(["eval", "--annotations", str(gt), "--results", str(res)]) == 0
        out = capsys.readouterr().out
        assert f"type={iou_type}" in out
        printed = [float(v) for v in re.findall(r"\] = (-?\d\.\d+)", out)]
        assert printed[:12] == ref[iou_type], iou_type  # all 12, to cocoapi's 3 decimals


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_evaluate_coco_gives_cocoapis_12_numbers_in_percent(cocoapi, iou_type):
    ref = _reference(cocoapi)[iou_type]
    stats, _ = evaluate_coco(cocoapi / "instances_val2014_100.json",
                             cocoapi / f"instances_val2014_fake{iou_type}100_results.json", iou_type)
    assert list(stats) == list(STAT_NAMES)
    assert [round(v / 100, 3) for v in stats.values()] == ref  # every one of the 12, to cocoapi's 3 decimals


def test_segm_size_buckets_use_mask_areas_even_when_results_carry_boxes(cocoapi):
    # Results written with both a bbox and a segmentation (as scratchdet writes them): COCO's loader
    # would take each detection's area from its box.  Give every detection a huge box; the segm
    # numbers must not move.
    gt = cocoapi / "instances_val2014_100.json"
    results = json.loads((cocoapi / "instances_val2014_fakesegm100_results.json").read_text())
    plain, _ = evaluate_coco(gt, results, "segm")
    with_boxes, _ = evaluate_coco(gt, [{**r, "bbox": [0.0, 0.0, 600.0, 600.0]} for r in results], "segm")
    assert with_boxes == plain
    assert plain["APs"] > 0 and plain["APl"] > 0


def test_no_detections_score_zero(cocoapi):
    stats, _ = evaluate_coco(cocoapi / "instances_val2014_100.json", [], "segm")
    assert all(v == 0 for v in stats.values())


def test_bad_iou_type():
    with pytest.raises(ValueError):
        evaluate_coco("x.json", [], "keypoints")
