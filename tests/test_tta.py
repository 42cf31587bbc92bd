
from dataclasses import replace

import pytest
import torch
from torchvision import tv_tensors

from scratchdet import tta
from scratchdet.config import load_config
from scratchdet.data import ResizeShortestEdge
from scratchdet.engine import train
from scratchdet.model import build_model
from scratchdet.run import read_metrics
from scratchdet.tta import keypoint_flip_map

from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH


def _model(*extra, **kwargs):
    torch.manual_seed(0)
    cfg = load_config(None, TINY_MODEL + ["model.score_thresh_test=0.0"] + list(extra))
    return build_model(replace(cfg.model, **kwargs), num_classes=3).eval()


def _image(h=96, w=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float()  # integer pixels, as the loader gives


@pytest.mark.parametrize("head", ["standard", "cascade"])
def test_one_size_without_flip_is_plain_inference(head):
    model = _model(f"model.roi_head={head}")
    image = _image()
    with torch.no_grad():
        plain = model([image])[0]
        aug = tta.TestTimeAug(min_sizes=[96], max_size=1000, flip=False)(model, [image])[0]
    assert len(plain["boxes"]) > 10
    assert set(aug) == set(plain) == {"boxes", "labels", "scores", "masks"}
    for k in plain:
        assert torch.equal(aug[k], plain[k]), k


def test_keypoint_model_one_size_without_flip_is_plain_inference():
    model = _model("model.keypoint_head_conv_dim=32", "model.keypoint_head_num_conv=2", task="keypoints", num_keypoints=3)
    image = _image()
    with torch.no_grad():
        plain = model([image])[0]
        aug = tta.TestTimeAug(min_sizes=[96], max_size=1000, flip=False, keypoint_flip=[1, 0, 2])(model, [image])[0]
    assert len(plain["boxes"]) > 10 and set(aug) == set(plain)
    for k in plain:
        assert torch.equal(aug[k], plain[k]), k


def test_another_size_maps_boxes_back_to_the_input():
    model = _model()
    image = _image()
    resize = ResizeShortestEdge([64], 1000)  # what the test loader would have given for min_size_test=64
    small = resize.transform(tv_tensors.Image(image.to(torch.uint8)),
                             resize.make_params([image])).as_subclass(torch.Tensor).float()
    assert small.shape[-2:] == (64, 85)
    with torch.no_grad():
        plain = model([small])[0]
        aug = tta.TestTimeAug(min_sizes=[64], max_size=1000, flip=False)(model, [image])[0]
    scale = torch.tensor([128 / 85, 96 / 64, 128 / 85, 96 / 64])
    assert torch.equal(aug["scores"], plain["scores"]) and torch.equal(aug["labels"], plain["labels"])
    torch.testing.assert_close(aug["boxes"], plain["boxes"] * scale)
    torch.testing.assert_close(aug["masks"], plain["masks"], atol=1e-4, rtol=0)


def _sorted(out):
    order = torch.argsort(out["scores"], descending=True)
    return {k: v[order] for k, v in out.items()}


@pytest.mark.parametrize("head", ["standard", "cascade"])
def test_flip_augmentation_is_mirror_symmetric(head):
    # TTA of an image and TTA of its mirror run the same two predictions (the image and its mirror), so
    # their merged results are mirror images: wrong unflipping of boxes or masks breaks this.
    model = _model(f"model.roi_head={head}")
    image = _image(seed=1)
    aug = tta.TestTimeAug(min_sizes=[96], max_size=1000, flip=True)
    with torch.no_grad():
        a = _sorted(aug(model, [image])[0])
        b = _sorted(aug(model, [image.flip(-1)])[0])
        single = model([image])[0]
    assert len(a["boxes"]) > len(single["boxes"]) // 2 and len(a["boxes"]) == len(b["boxes"])
    torch.testing.assert_close(a["scores"], b["scores"])
    assert torch.equal(a["labels"], b["labels"])
    mirrored = torch.stack([128 - a["boxes"][:, 2], a["boxes"][:, 1], 128 - a["boxes"][:, 0], a["boxes"][:, 3]], 1)
    torch.testing.assert_close(b["boxes"], mirrored, atol=1e-4, rtol=0)
    torch.testing.assert_close(b["masks"], a["masks"].flip(-1), atol=1e-6, rtol=0)
    # The merge saw both augmentations: the result is not the unflipped prediction alone.
    assert not torch.equal(a["scores"], single["scores"][: len(a["scores"])])


def test_flipped_keypoint_heatmaps_are_mirrored_and_swapped_back():
    # Keypoints 0 and 1 are a left/right pair, 2 is central: TTA of the mirror image gives the mirrored
    # keypoints with the pair swapped, only if flipped heatmaps are mapped back by the flip map.
    model = _model("model.keypoint_head_conv_dim=32", "model.keypoint_head_num_conv=2", task="keypoints", num_keypoints=3)
    image = _image(seed=2)
    aug = tta.TestTimeAug(min_sizes=[96], max_size=1000, flip=True, keypoint_flip=[1, 0, 2])
    with torch.no_grad():
        a = _sorted(aug(model, [image])[0])
        b = _sorted(aug(model, [image.flip(-1)])[0])
    assert len(a["boxes"]) > 10 and len(a["boxes"]) == len(b["boxes"])
    expected = a["keypoints"][:, [1, 0, 2]].clone()
    expected[..., 0] = 128 - expected[..., 0]
    torch.testing.assert_close(b["keypoints"][..., :2], expected[..., :2], atol=1e-3, rtol=0)
    torch.testing.assert_close(b["keypoints_scores"], a["keypoints_scores"][:, [1, 0, 2]], atol=1e-4, rtol=0)


def test_keypoint_flip_map_from_coco_names():
    cats = [{"id": 1, "name": "person", "keypoints": ["nose", "left_eye", "right_eye", "left_ankle", "right_ankle"]}]
    assert keypoint_flip_map(cats) == [0, 2, 1, 4, 3]
    assert keypoint_flip_map([{"id": 1, "name": "a"}]) is None
    assert keypoint_flip_map([{"id": 1, "name": "a", "keypoints": ["left_eye", "nose"]}]) is None


def test_evaluation_with_test_aug(tmp_path, monkeypatch):
    calls = []
    original = tta.TestTimeAug.predict

    def counting(self, model, image):
        calls.append((tuple(image.shape), tuple(self.min_sizes), self.flip))
        return original(self, model, image)

    monkeypatch.setattr(tta.TestTimeAug, "predict", counting)
    cfg = load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + [
        "solver.max_iter=2", "test.aug=true", "test.aug_min_sizes=[64,96]", "test.aug_max_size=200"])
    result = train(cfg, tmp_path / "run", progress=False)
    # The 4 validation images, each at its original size (the loader does not resize under test.aug).
    assert calls == [((3, 96, 96), (64, 96), True)] * 4
    final = [r for r in read_metrics(tmp_path / "run") if "bbox/AP" in r][-1]
    assert 0 <= final["bbox/AP"] <= 100 and 0 <= final["segm/AP"] <= 100
    assert result["segm/AP"] == final["segm/AP"]
