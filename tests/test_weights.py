import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from scratchdet.config import load_config
from scratchdet.model import ResNet, build_model, model_kwargs, trunk_kwargs
from scratchdet.weights import WeightsError, caffe2_to_torchvision, load_backbone, load_caffe2_pickle, save_caffe2_pickle

from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH


def _to_caffe2(state):
    """Our (torchvision) names -> Detectron's Caffe2 blob names, conv1 back to BGR."""
    blobs = {}
    for k, v in state.items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        a = v.numpy().copy()
        if k == "conv1.weight":
            blobs["conv1_w"] = a[:, ::-1].copy()
            continue
        if k.startswith("bn1."):
            blobs["conv1_gn_" + ("s" if k.endswith("weight") else "b")] = a
            continue
        layer, block, rest = k.split(".", 2)
        stage = int(layer[-1]) + 1
        branch = {"conv1": "2a", "bn1": "2a", "conv2": "2b", "bn2": "2b", "conv3": "2c", "bn3": "2c",
                  "downsample": "1"}[rest.split(".")[0]]
        kind = "w" if rest in ("conv1.weight", "conv2.weight", "conv3.weight", "downsample.0.weight") else (
            "gn_s" if rest.endswith("weight") else "gn_b")
        blobs[f"res{stage}_{block}_branch{branch}_{kind}"] = a
    return blobs


def test_detectron_pickle_made_by_the_test_loads(tmp_path):
    trunk = ResNet(depth=50, norm="GN", stride_in_1x1=True)
    blobs = _to_caffe2(trunk.state_dict())
    blobs["fc1000_w"] = np.zeros((1000, 2048), np.float32)
    blobs["conv1_w_momentum"] = np.zeros(1, np.float32)
    path = tmp_path / "R-50-GN.pkl"
    save_caffe2_pickle(blobs, path)
    fresh = ResNet(depth=50, norm="GN", stride_in_1x1=True)
    meta = load_backbone(fresh, str(path), depth=50, norm="GN")
    assert meta["missing"] == [] and meta["unexpected"] == []
    for k, v in trunk.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # conv1 came in BGR and was flipped to RGB
    assert torch.equal(torch.from_numpy(blobs["conv1_w"]).flip(1), fresh.conv1.weight)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": Evil()}}, protocol=2))
    with pytest.raises(WeightsError, match="refusing to load posix.system|refusing to load os.system"):
        load_caffe2_pickle(path)
    assert not (tmp_path / "pwned").exists()


def test_torchvision_state_dict_loads_with_frozen_bn(tmp_path):
    donor = ResNet(depth=18, norm="BN")
    with torch.no_grad():
        for m in donor.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_()
    state = {**donor.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    trunk = ResNet(depth=18, norm="FrozenBN")
    meta = load_backbone(trunk, str(path), depth=18, norm="FrozenBN")
    assert meta["missing"] == []
    assert torch.equal(trunk.bn1.running_mean, donor.bn1.running_mean)


def test_bn_weights_under_gn_are_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(ResNet(depth=18, norm="BN").state_dict(), path)
    with pytest.raises(WeightsError, match="BatchNorm weights .* model.norm is GN"):
        load_backbone(ResNet(depth=18, norm="GN"), str(path), depth=18, norm="GN")


def test_shape_mismatch_is_an_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(ResNet(depth=18, norm="GN", base_width=32, gn_groups=8).state_dict(), path)
    with pytest.raises(WeightsError, match="shape"):
        load_backbone(ResNet(depth=18, norm="GN"), str(path), depth=18, norm="GN")


def test_missing_and_unexpected_keys_are_reported(tmp_path, caplog):
    state = ResNet(depth=18, norm="GN").state_dict()
    state.pop("layer4.1.conv2.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    meta = load_backbone(ResNet(depth=18, norm="GN"), str(path), depth=18, norm="GN")
    assert meta["missing"] == ["layer4.1.conv2.weight"] and meta["unexpected"] == ["extra.weight"]
    assert "not in the file" in caplog.text and "not used" in caplog.text


def test_offline_imagenet_download_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match=r"R-50-GN.pkl .*place it at .*hub/checkpoints/R-50-GN.pkl"):
        load_backbone(ResNet(depth=50, norm="GN"), "imagenet", depth=50, norm="GN")
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd.pth"):
        load_backbone(ResNet(depth=18, norm="FrozenBN"), "imagenet", depth=18, norm="FrozenBN")


def test_caffe2_unknown_blob_is_an_error():
    with pytest.raises(WeightsError, match="unexpected blob"):
        caffe2_to_torchvision({"mystery_w": np.zeros(1, np.float32)})


def _image_folder(root):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_pretrain_then_finetune_starts_from_the_pretrained_backbone(tmp_path):
    from scratchdet.engine import read_metrics, train
    from scratchdet.pretrain import pretrain

    _image_folder(tmp_path / "folder")
    cfg = load_config(None, TINY_MODEL + [f"pretrain.images={tmp_path / 'folder'}", "pretrain.crop_size=32",
                                          "solver.max_iter=3", "solver.ims_per_batch=4", "solver.warmup_iters=1",
                                          "dataloader.num_workers=0", "train.log_period=1", "train.device=cpu"])
    path = pretrain(cfg, tmp_path / "pre", progress=False)
    pre = read_metrics(tmp_path / "pre")
    assert pre[-1]["images_seen"] == 12 and pre[-1]["pixels_seen"] == 12 * 32 * 32
    state = torch.load(path, weights_only=True)
    # The detector built with model.init=PATH starts from exactly those weights.
    ft_cfg = load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + [f"model.init={path}", "solver.max_iter=2"])
    model = build_model(**model_kwargs(ft_cfg.model, 3))
    load_backbone(model.backbone.body, str(path), depth=18, norm="GN")
    for k, v in state["backbone"].items():
        assert torch.equal(model.backbone.body.state_dict()[k], v), k
    assert set(trunk_kwargs(ft_cfg.model)) <= set(model_kwargs(ft_cfg.model, 3))
    # And a fine-tuning run records what the pre-training saw beside what it sees.
    result = train(ft_cfg, tmp_path / "ft", progress=False)
    lines = [r for r in read_metrics(tmp_path / "ft") if "loss" in r]
    assert lines[-1]["pretrain_images_seen"] == 12 and lines[-1]["images_seen"] == 4
    assert result["pretrain_pixels_seen"] == 12 * 32 * 32


def test_freeze_at_freezes_stem_and_res2():
    cfg = load_config(None, TINY_MODEL + ["model.freeze_at=2"])
    model = build_model(**model_kwargs(cfg.model, 3))
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
