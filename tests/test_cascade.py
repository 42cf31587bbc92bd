import math
from dataclasses import replace

import pytest
import torch

from scratchdet.cascade import CascadeRoIHeads
from scratchdet.config import load_config
from scratchdet.engine import train
from scratchdet.layers import sampling_seeds
from scratchdet.model import build_model
from scratchdet.run import read_metrics

from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH

CASCADE = ["model.roi_head=cascade"]


def _detector(*extra, num_classes=3):
    cfg = load_config(None, TINY_MODEL + CASCADE + list(extra))
    return build_model(cfg.model, num_classes=num_classes)


def _batch():
    masks = torch.zeros(1, 96, 128, dtype=torch.uint8)
    masks[0, 10:40, 20:70] = 1
    images = [torch.rand(3, 96, 128) * 255, torch.rand(3, 96, 128) * 255]
    targets = [{"boxes": torch.tensor([[20.0, 10, 70, 40]]), "labels": torch.tensor([1]), "masks": masks},
               {"boxes": torch.tensor([[30.0, 30, 90, 80]]), "labels": torch.tensor([2]),
                "masks": torch.zeros(1, 96, 128, dtype=torch.uint8)}]
    return images, targets


def test_cascade_trains_and_evaluates_on_synthetic(tmp_path):
    cfg = load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + CASCADE + ["solver.max_iter=4"])
    result = train(cfg, tmp_path / "run", progress=False)
    lines = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    names = {f"loss_{kind}_stage{k}" for kind in ("classifier", "box_reg") for k in range(3)} | {"loss_mask"}
    assert names <= set(lines[-1]), sorted(lines[-1])
    assert "loss_classifier" not in lines[-1]  # the standard head is gone, not run beside the cascade
    assert all(math.isfinite(r[n]) for r in lines for n in names)
    assert 0 <= result["bbox/AP"] <= 100 and 0 <= result["segm/AP"] <= 100


def test_stage_losses_carry_the_stage_weights():
    images, targets = _batch()
    losses = {}
    for weights in ("[1,1,1]", "[1,0.5,0.25]"):
        torch.manual_seed(0)
        model = _detector(f"model.cascade_weights={weights}")
        with sampling_seeds([11, 12]):  # the same anchor and RoI samples for both models
            losses[weights] = model(images, targets)
    plain, weighted = losses["[1,1,1]"], losses["[1,0.5,0.25]"]
    for k, w in enumerate((1.0, 0.5, 0.25)):
        for kind in ("classifier", "box_reg"):
            name = f"loss_{kind}_stage{k}"
            assert plain[name] > 0, name
            torch.testing.assert_close(weighted[name], plain[name] * w, rtol=1e-6, atol=0)
    torch.testing.assert_close(weighted["loss_mask"], plain["loss_mask"], rtol=1e-6, atol=0)


def _shifted(box, iou):
    """``box`` moved right so that its IoU with ``box`` is ``iou`` (same size: IoU = (w - d) / (w + d))."""
    w = box[2] - box[0]
    d = w * (1 - iou) / (1 + iou)
    return [box[0] + d, box[1], box[2] + d, box[3]]


def test_each_stage_labels_at_its_own_iou():
    heads = _detector().roi_heads
    assert isinstance(heads, CascadeRoIHeads) and heads.ious == (0.5, 0.6, 0.7)
    gt = [10.0, 10.0, 50.0, 50.0]
    proposals = [torch.tensor([_shifted(gt, iou) for iou in (0.55, 0.65, 0.75, 0.3)])]
    targets = [{"boxes": torch.tensor([gt]), "labels": torch.tensor([2])}]
    expected = {0: [2, 2, 2, 0, 2], 1: [0, 2, 2, 0, 2], 2: [0, 0, 2, 0, 2]}  # the gt box itself appended last
    reg = {}
    for stage, labels in expected.items():
        boxes, matched, got, reg[stage] = heads.sample_stage(stage, proposals, targets)
        assert got[0].tolist() == labels, f"stage {stage} (IoU {heads.ious[stage]})"
        assert len(boxes[0]) == 5 and matched[0].tolist() == [0] * 5
    # Per-stage box coders: detectron2's (10, 10, 5, 5) x (stage + 1), so the targets scale with the stage.
    torch.testing.assert_close(reg[1][0], reg[0][0] * 2)
    torch.testing.assert_close(reg[2][0], reg[0][0] * 3)


def test_inference_scores_are_the_stage_average_and_masks_come_with_them():
    torch.manual_seed(0)
    # One class, no score threshold, no suppression: every RoI's score reaches the output.
    model = _detector("model.score_thresh_test=0.0", "model.nms_thresh_test=1.0", "model.detections_per_image=1000",
                      num_classes=1).eval()
    logits = []
    for predictor in model.roi_heads.box_predictor:
        predictor.register_forward_hook(lambda m, i, o: logits.append(o[0]))
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128) * 255])[0]
    assert len(logits) == 3 and len({len(x) for x in logits}) == 1  # every stage scores the same RoIs
    probs = [torch.softmax(x, -1)[:, 1] for x in logits]
    mean = sum(probs) / 3
    assert len(out["scores"]) > 20
    nearest = (out["scores"][:, None] - mean[None]).abs().min(1).values
    assert nearest.max() < 1e-6
    from_last = (out["scores"][:, None] - probs[-1][None]).abs().min(1).values
    assert from_last.max() > 1e-4  # the last stage's own scores are not the output
    assert out["masks"].shape == (len(out["boxes"]), 1, 28, 28)
    assert out["labels"].eq(1).all()


def test_box_decoding_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = _detector("model.score_thresh_test=0.0").eval()
    seen = []
    model.roi_heads.box_roi_pool.register_forward_hook(lambda m, i, o: seen.append(("rois", i[1][0].dtype)))
    for predictor in model.roi_heads.box_predictor:
        predictor.register_forward_hook(lambda m, i, o: seen.append(("deltas", o[1].dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([torch.rand(3, 800, 1216) * 255])[0]
    assert [kind for kind, _ in seen] == ["rois", "deltas"] * 3
    assert all(dtype == torch.float32 for _, dtype in seen), seen
    assert out["boxes"].dtype == out["scores"].dtype == torch.float32
    far = out["boxes"][out["boxes"] > 512]
    assert len(far) > 20 and (far % 4 != 0).float().mean() > 0.5  # bf16 would round these to multiples of 4


def test_cascade_refuses_keypoints():
    cfg = load_config(None, TINY_MODEL + ["model.keypoint_head_conv_dim=32", "model.keypoint_head_num_conv=2"])
    with pytest.raises(ValueError, match="keypoints"):
        build_model(replace(cfg.model, task="keypoints", num_keypoints=3, roi_head="cascade"), num_classes=1)
