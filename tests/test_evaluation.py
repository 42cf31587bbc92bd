import contextlib
import copy
import io
import json
import math
import re

import faster_coco_eval.core.mask as mask_utils
import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from scratchdet.cli import main
from scratchdet.evaluation import STAT_NAMES, evaluate_coco, evaluate_coco_types, run_inference, to_coco_results
from scratchdet.model import paste_detections


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
        evaluate_coco("x.json", [], "boundary")  # keypoints is one of IOU_TYPES (tests/test_keypoints.py)


# --------------------------------------------------------------------------- scoring both types at once


def _boxes_and_masks(cocoapi):
    """cocoapi's fake mask results, each given a box (its mask's, widened): one file with both, as
    scratchdet writes its results."""
    import faster_coco_eval.core.mask as mask_utils

    results = json.loads((cocoapi / "instances_val2014_fakesegm100_results.json").read_text())
    boxes = mask_utils.toBbox([r["segmentation"] for r in results])
    return [{**r, "bbox": [float(x) - 2, float(y) - 2, float(w) + 4, float(h) + 4]} for r, (x, y, w, h) in
            zip(results, boxes)]


def test_both_types_from_one_call_equal_one_type_at_a_time(cocoapi):
    gt = cocoapi / "instances_val2014_100.json"
    results = _boxes_and_masks(cocoapi)
    before = json.dumps(results)
    both = evaluate_coco_types(gt, results)
    assert list(both) == ["bbox", "segm"]
    assert both["bbox"] == evaluate_coco(gt, results, "bbox")
    assert both["segm"] == evaluate_coco(gt, results, "segm")
    # segm by mask areas, whatever the boxes: cocoapi's own segm numbers, all 12.
    assert [round(v / 100, 3) for v in both["segm"][0].values()] == _reference(cocoapi)["segm"]
    assert json.dumps(results) == before  # the caller's detections are left as they were
    assert evaluate_coco_types(gt, results, ["segm"]) == {"segm": both["segm"]}


def test_both_types_equal_pycocotools(cocoapi):
    pytest.importorskip("pycocotools", reason="pycocotools is the benchmark's reference (pip install '.[bench]')")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = _boxes_and_masks(cocoapi)
    ours = evaluate_coco_types(cocoapi / "instances_val2014_100.json", results)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(cocoapi / "instances_val2014_100.json"))
        for iou_type in ("bbox", "segm"):
            # As detectron2 scores segm: without the boxes, so that areas are the masks'.
            res = [{k: v for k, v in r.items() if iou_type == "bbox" or k != "bbox"} for r in copy.deepcopy(results)]
            ev = COCOeval(gt, gt.loadRes(res), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            ref = [float(v) * 100 for v in ev.stats[:12]]
            # Equal as cocoapi prints them; below that, faster-coco-eval's precisions are tp / (tp + fp) where
            # pycocotools divides by tp + fp + np.spacing(1): a precision of 1 is 0.9999999999999998 there,
            # which moves some numbers in their 16th digit.
            assert [round(v / 100, 3) for v in ours[iou_type][0].values()] == [round(v / 100, 3) for v in ref]
            assert list(ours[iou_type][0].values()) == pytest.approx(ref, rel=1e-13, abs=1e-13), iou_type


def _through_load_res(gt_path, results, iou_type):
    """The 12 numbers by faster-coco-eval's own path: loadRes (on copies; for segm without boxes), then COCOeval."""
    from faster_coco_eval import COCO, COCOeval_faster

    res = [{k: v for k, v in r.items() if iou_type == "bbox" or k != "bbox"} for r in copy.deepcopy(results)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval_faster(gt, gt.loadRes(res), iou_type, print_function=lambda *a: None)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) * 100 for v in ev.stats[:12]]


@pytest.mark.parametrize(("kind", "iou_type"), [("bbox", "bbox"), ("segm", "segm"), ("segm", "bbox"), ("both", "bbox"),
                                                ("both", "segm")])
def test_results_indexed_once_give_load_res_numbers(cocoapi, kind, iou_type):
    # scratchdet indexes results once for both types and sets areas itself; loadRes is the reference,
    # including for masks without boxes scored as bbox (loadRes gives them their masks' boxes and areas).
    gt = cocoapi / "instances_val2014_100.json"
    if kind == "both":
        results = _boxes_and_masks(cocoapi)
    else:
        results = json.loads((cocoapi / f"instances_val2014_fake{kind}100_results.json").read_text())
    stats, _ = evaluate_coco(gt, results, iou_type)
    assert list(stats.values()) == _through_load_res(gt, results, iou_type)


def test_results_that_do_not_fit_the_ground_truth_are_refused(cocoapi):
    gt = cocoapi / "instances_val2014_100.json"
    boxes = json.loads((cocoapi / "instances_val2014_fakebbox100_results.json").read_text())
    with pytest.raises(ValueError, match="image id"):
        evaluate_coco(gt, [{**boxes[0], "image_id": 123456789}], "bbox")
    with pytest.raises(ValueError, match="masks"):
        evaluate_coco(gt, boxes, "segm")


def test_cli_scores_boxes_and_masks_of_one_file(cocoapi, tmp_path, capsys):
    ref = _reference(cocoapi)
    res = tmp_path / "both.json"
    res.write_text(json.dumps(_boxes_and_masks(cocoapi)))
    gt = cocoapi / "instances_val2014_100.json"
    numbers = tmp_path / "numbers.json"
    assert main(["eval", "--annotations", str(gt), "--results", str(res), "--json", str(numbers)]) == 0
    out = capsys.readouterr().out
    assert out.index("type=bbox") < out.index("type=segm")
    printed = [float(v) for v in re.findall(r"\] = (-?\d\.\d+)", out)]
    assert len(printed) == 28 and printed[14:26] == ref["segm"]  # 14 lines per type; 12 are COCO's
    written = json.loads(numbers.read_text())[str(res)]
    assert len(written) == 24 and written == {f"{t}/{k}": v for t, (stats, _) in
                                              evaluate_coco_types(gt, res).items() for k, v in stats.items()}
    assert main(["eval", "--annotations", str(gt), "--results", str(res), "--iou-type", "segm"]) == 0
    out = capsys.readouterr().out
    assert "type=segm" in out and "type=bbox" not in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]))
    assert main(["eval", "--annotations", str(gt), "--results", str(bad)]) == 2
    assert "image id" in capsys.readouterr().err


# --------------------------------------------------------------------------- post-processing


def _random_boxes(gen: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """Boxes with centres in the image, from sub-pixel to several times the image: many reach past
    its edges.  (torchvision's paste fails on a box wholly outside.)"""
    cx, cy = torch.rand(n, generator=gen) * w, torch.rand(n, generator=gen) * h
    side = torch.exp(torch.empty(n).uniform_(math.log(0.05), math.log(3 * max(h, w)), generator=gen))
    bw = side * torch.exp(torch.randn(n, generator=gen) * 0.7)
    bh = side * torch.exp(torch.randn(n, generator=gen) * 0.7)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)


def _torchvision_paste(masks: torch.Tensor, boxes: torch.Tensor, hw: tuple[int, int], threshold: float) -> torch.Tensor:
    if not len(boxes):
        return torch.zeros((0, *hw), dtype=torch.bool)
    return paste_masks_in_image(masks, boxes, hw, padding=1)[:, 0] >= threshold


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.0])
def test_paste_gives_torchvisions_masks_bit_for_bit(threshold):
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        h, w = (int(v) for v in torch.randint(1, 160, (2,), generator=gen))
        n = int(torch.randint(0, 12, (1,), generator=gen))
        boxes = _random_boxes(gen, n, h, w)
        masks = torch.rand(n, 1, 28, 28, generator=gen)
        masks[: n // 2] = (masks[: n // 2] - 0.5) * 0.01 + 0.5  # many values near the threshold
        out = {"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64), "scores": torch.rand(n, generator=gen),
               "masks": masks}
        pasted = paste_detections(out, (h, w), (h, w), mask_threshold=threshold)["masks"]
        expected = _torchvision_paste(masks, boxes, (h, w), threshold)
        assert pasted.dtype == torch.bool and pasted.shape == expected.shape == (n, h, w)
        assert torch.equal(pasted, expected), (trial, threshold)


def test_paste_from_network_input_to_original_size():
    # Boxes scaled from the network input (here 100x150) to the original image (333x500) first.
    gen = torch.Generator().manual_seed(1)
    boxes = _random_boxes(gen, 40, 100, 150)
    masks = torch.rand(40, 1, 28, 28, generator=gen)
    out = {"boxes": boxes, "labels": torch.ones(40, dtype=torch.int64), "scores": torch.rand(40), "masks": masks}
    pasted = paste_detections(out, (100, 150), (333, 500))
    scale = torch.tensor([500 / 150, 333 / 100, 500 / 150, 333 / 100])
    assert torch.equal(pasted["boxes"], boxes * scale)
    assert torch.equal(pasted["masks"], _torchvision_paste(masks, boxes * scale, (333, 500), 0.5))


def _model_output(seed: int, n: int, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A fixed Mask R-CNN output for one image: clipped boxes, sorted scores, labels, mask probabilities."""
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    boxes = _random_boxes(gen, n, h, w)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return {"boxes": boxes, "scores": torch.rand(n, generator=gen).sort(descending=True).values,
            "labels": torch.randint(1, 4, (n,), generator=gen), "masks": torch.rand(n, 1, 28, 28, generator=gen)}


def _previous_results(output: dict[str, torch.Tensor], input_hw: tuple[int, int], orig_hw: tuple[int, int],
                      image_id: int, label_to_cat_id: dict[int, int]) -> list[dict]:
    """scratchdet's paste_detections + to_coco_results before they were batched, as they were."""
    (h, w), (h0, w0) = input_hw, orig_hw
    boxes = output["boxes"] * torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h], dtype=output["boxes"].dtype)
    masks = _torchvision_paste(output["masks"], boxes, orig_hw, 0.5)
    b, s, lab = boxes.float().numpy(), output["scores"].float().numpy(), output["labels"].numpy()
    rles = []
    if len(b):
        rles = mask_utils.encode(np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0)))
    out = []
    for k in range(len(b)):
        x0, y0, x1, y1 = (float(v) for v in b[k])
        out.append({"image_id": int(image_id), "category_id": int(label_to_cat_id[int(lab[k])]),
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(float(s[k]), 5),
                    "segmentation": {"size": rles[k]["size"], "counts": rles[k]["counts"].decode("ascii")}})
    return out


@pytest.mark.parametrize(("n", "input_hw", "orig_hw"), [(100, (200, 300), (200, 300)), (50, (120, 90), (427, 320)),
                                                         (0, (64, 64), (100, 80))])
def test_results_are_those_of_the_previous_code_byte_for_byte(n, input_hw, orig_hw):
    output = _model_output(n, n, input_hw)
    label_to_cat_id = {1: 1, 2: 18, 3: 90}
    results = to_coco_results(paste_detections(output, input_hw, orig_hw), 42, label_to_cat_id)
    assert json.dumps(results) == json.dumps(_previous_results(output, input_hw, orig_hw, 42, label_to_cat_id))
    assert len(results) == n


class _FixedOutputs(torch.nn.Module):
    """A stand-in detector: hands out prepared outputs, one per image, in order."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]]):
        super().__init__()
        self.outputs = outputs
        self.seen = 0

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = self.outputs[self.seen:self.seen + len(images)]
        self.seen += len(images)
        return out


def test_run_inference_writes_the_previous_codes_results():
    # Two batches, images resized from their original sizes as the test loader resizes them.
    sizes = [((96, 128), (300, 400)), ((128, 96), (480, 360)), ((96, 96), (96, 96))]
    outputs = [_model_output(10 + k, 30, hw) for k, (hw, _) in enumerate(sizes)]
    batches = [([torch.zeros(3, *hw) for hw, _ in sizes[:2]],
                [{"image_id": 7, "orig_size": sizes[0][1]}, {"image_id": 9, "orig_size": sizes[1][1]}]),
               ([torch.zeros(3, *sizes[2][0])], [{"image_id": 11, "orig_size": sizes[2][1]}])]
    label_to_cat_id = {1: 5, 2: 6, 3: 7}
    results, image_ids = run_inference(_FixedOutputs(outputs), batches, device=torch.device("cpu"),
                                       label_to_cat_id=label_to_cat_id)
    expected = [r for out, (hw, orig), image_id in zip(outputs, sizes, (7, 9, 11))
                for r in _previous_results(out, hw, orig, image_id, label_to_cat_id)]
    assert image_ids == [7, 9, 11]
    assert json.dumps(results) == json.dumps(expected)
