import logging
import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from scratchdet.checkpoint import save_checkpoint
from scratchdet.config import load_config, to_dict
from scratchdet.model import ResNet, build_model
from scratchdet.weights import (
    WeightsError,
    caffe2_to_torchvision,
    load_backbone,
    load_caffe2_pickle,
    load_init,
    save_caffe2_pickle,
)

from .conftest import TINY_MODEL


def _to_caffe2(state, norm="gn"):
    """Our (torchvision) names -> Detectron's Caffe2 blob names, conv1 back to BGR; ``norm="bn"`` writes
    MSRA's AffineChannel blobs (``*_bn_s``/``*_bn_b``, no running statistics)."""
    blobs = {}
    for k, v in state.items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        a = v.numpy().copy()
        if k == "conv1.weight":
            blobs["conv1_w"] = a[:, ::-1].copy()
            continue
        if k.startswith("bn1."):
            blobs[f"conv1_{norm}_" + ("s" if k.endswith("weight") else "b")] = a
            continue
        layer, block, rest = k.split(".", 2)
        stage = int(layer[-1]) + 1
        branch = {"conv1": "2a", "bn1": "2a", "conv2": "2b", "bn2": "2b", "conv3": "2c", "bn3": "2c",
                  "downsample": "1"}[rest.split(".")[0]]
        kind = "w" if rest in ("conv1.weight", "conv2.weight", "conv3.weight", "downsample.0.weight") else (
            f"{norm}_s" if rest.endswith("weight") else f"{norm}_b")
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
    caplog.set_level(logging.INFO, logger="scratchdet")
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


def test_freeze_at_freezes_stem_and_res2():
    cfg = load_config(None, TINY_MODEL + ["model.freeze_at=2", "model.init=imagenet"])  # built, not loaded
    model = build_model(cfg.model, num_classes=3)
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())


# --------------------------------------------------------------------------- norm mismatches


def _detector(norm="GN", num_classes=3, **overrides):
    """The tiny Mask R-CNN; FrozenBN set here because the config refuses it without model.init."""
    return build_model(replace(load_config(None, TINY_MODEL).model, norm=norm, **overrides), num_classes=num_classes)


def _randomize(model):
    """Every float tensor away from its init, so that 'loaded' cannot pass by coincidence."""
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.rand_like(v) + 0.5)
    return model


def test_bn_caffe2_pickle_under_gn_is_refused(tmp_path):
    path = tmp_path / "R-18.pkl"
    save_caffe2_pickle(_to_caffe2(_detector("FrozenBN").backbone.body.state_dict(), norm="bn"), path)
    with pytest.raises(WeightsError, match=r"R-18.pkl: holds BatchNorm weights \(the file's norm is BN: Caffe2 blobs "
                                           r"\*_bn_s/\*_bn_b.* model.norm is GN"):
        load_backbone(_detector("GN").backbone.body, str(path), depth=18, norm="GN")


@pytest.mark.parametrize("norm", ["BN", "SyncBN", "FrozenBN"])
def test_gn_caffe2_pickle_under_bn_family_is_refused(tmp_path, norm):
    path = tmp_path / "R-18-GN.pkl"
    save_caffe2_pickle(_to_caffe2(_detector("GN").backbone.body.state_dict()), path)
    with pytest.raises(WeightsError, match=rf"R-18-GN.pkl: holds GroupNorm weights \(the file's norm is GN.* model.norm "
                                           rf"is {norm}\b"):
        load_backbone(_detector(norm).backbone.body, str(path), depth=18, norm=norm)


def test_msra_bn_pickle_into_frozen_bn_gets_affine_channel_statistics(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="scratchdet")
    donor = _randomize(_detector("FrozenBN")).backbone.body
    path = tmp_path / "R-18.pkl"
    save_caffe2_pickle(_to_caffe2(donor.state_dict(), norm="bn"), path)
    trunk = _randomize(_detector("FrozenBN")).backbone.body  # statistics that must not survive
    meta = load_backbone(trunk, str(path), depth=18, norm="FrozenBN")
    assert meta["missing"] == [] and meta["unexpected"] == []
    for k, v in trunk.state_dict().items():
        if k.endswith("running_mean"):
            assert torch.equal(v, torch.zeros_like(v)), k
        elif k.endswith("running_var"):
            assert torch.equal(v, torch.ones_like(v)), k
        elif k != "conv1.weight":  # conv1 went through BGR and back
            assert torch.equal(v, donor.state_dict()[k]), k
    assert "running mean 0 and var 1" in caplog.text


def test_norm_free_weights_and_norm_free_models_are_refused(tmp_path):
    path = tmp_path / "none.pth"
    torch.save(_detector("none").backbone.body.state_dict(), path)
    with pytest.raises(WeightsError, match=r"without normalization layers \(the file's norm is none.* model.norm is GN"):
        load_backbone(_detector("GN").backbone.body, str(path), depth=18, norm="GN")
    path = tmp_path / "gn.pth"
    torch.save(_detector("GN").backbone.body.state_dict(), path)
    with pytest.raises(WeightsError, match=r"holds GroupNorm weights .* model.norm is none"):
        load_backbone(_detector("none").backbone.body, str(path), depth=18, norm="none")


def test_pretrain_and_run_checkpoints_say_their_norm(tmp_path):
    # A `scratchdet pretrain` checkpoint's meta and a run's config are believed over the tensors.
    path = tmp_path / "backbone_final.pth"
    save_checkpoint(path, {"backbone": _detector("GN").backbone.body.state_dict(), "meta": {"norm": "SyncBN"}})
    with pytest.raises(WeightsError, match=r"the file's norm is SyncBN: recorded by `scratchdet pretrain`.* is GN"):
        load_backbone(_detector("GN").backbone.body, str(path), depth=18, norm="GN")
    path = tmp_path / "model_final.pth"
    cfg = load_config(None, TINY_MODEL)
    save_checkpoint(path, {"model": _detector("GN").state_dict(), "config": to_dict(cfg), "meta": {}})
    with pytest.raises(WeightsError, match=r"the file's norm is GN: the run's config, model.norm.* is FrozenBN"):
        load_init(_detector("FrozenBN"), str(path), depth=18, norm="FrozenBN")


# --------------------------------------------------------------------------- detection checkpoints

PARTS = ["trunk", "FPN", "RPN", "box head", "box predictor", "mask head", "mask predictor"]
CLASS_LAYERS = [f"roi_heads.{layer}.{p}" for layer in ("box_predictor.cls_score", "box_predictor.bbox_pred",
                                                       "mask_predictor.mask_fcn_logits") for p in ("weight", "bias")]
SEEN = {"images_seen": 24, "instances_seen": 70, "pixels_seen": 24 * 96 * 96}


def _save_run_checkpoint(path, model, *, num_classes=3, iteration=6):
    """What the training engine writes: model, config, meta, seen (plus the solver's state)."""
    cfg = load_config(None, TINY_MODEL + [f"model.num_classes={num_classes}"])
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "iteration": iteration, "seen": SEEN,
                           "meta": {"class_names": [f"c{i}" for i in range(num_classes)], "label_to_cat_id": {}}})
    return path


def test_scratchdet_checkpoint_loads_the_whole_detector(tmp_path):
    donor = _randomize(_detector("GN"))
    path = _save_run_checkpoint(tmp_path / "model_0000006.pth", donor)
    model = _detector("GN")
    meta = load_init(model, str(path), depth=18, norm="GN")
    for k, v in donor.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert meta["format"] == "scratchdet-checkpoint" and meta["source"] == str(path)
    assert meta["loaded_parts"] == PARTS and meta["missing"] == [] and meta["unexpected"] == []
    assert meta["seen"] == SEEN  # carried into the fine-tuning run's log lines as pretrain_*


def test_checkpoint_for_other_classes_loads_all_but_the_class_layers(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="scratchdet")
    donor = _randomize(_detector("GN", num_classes=5))
    path = _save_run_checkpoint(tmp_path / "model_final.pth", donor, num_classes=5)
    model = _detector("GN", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meta = load_init(model, str(path), depth=18, norm="GN")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k] if k in CLASS_LAYERS else donor.state_dict()[k]), k
    assert sorted(meta["skipped"]) == sorted(CLASS_LAYERS) and sorted(meta["missing"]) == sorted(CLASS_LAYERS)
    assert meta["loaded_parts"] == ["trunk", "FPN", "RPN", "box head", "mask head"]
    assert meta["partial_parts"] == ["mask predictor"] and meta["init_parts"] == ["box predictor"]  # all but conv5_mask
    assert "another number of classes" in caplog.text and "roi_heads.box_predictor.cls_score.weight" in caplog.text
    assert ("loaded trunk, FPN, RPN, box head, mask head; partly loaded mask predictor; left at their init: box "
            "predictor") in caplog.text


def test_run_directory_gives_model_final_else_the_newest_valid_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old, new, final = (_randomize(_detector("GN")) for _ in range(3))
    _save_run_checkpoint(run / "model_0000002.pth", old, iteration=2)
    _save_run_checkpoint(run / "model_0000005.pth", new, iteration=5)
    (run / "model_0000008.pth").write_bytes(b"half a checkpoint")  # a killed write: no sidecar
    model = _detector("GN")
    meta = load_init(model, str(run), depth=18, norm="GN")
    assert meta["source"] == str(run / "model_0000005.pth") and meta["iteration"] == 5
    assert torch.equal(model.backbone.body.conv1.weight, new.backbone.body.conv1.weight)
    _save_run_checkpoint(run / "model_final.pth", final, iteration=9)
    meta = load_init(model, str(run), depth=18, norm="GN")
    assert meta["source"] == str(run / "model_final.pth")
    assert torch.equal(model.roi_heads.mask_head[0][0].weight, final.roi_heads.mask_head[0][0].weight)


def test_plain_detector_state_dict_loads_and_its_trunk_loads_alone(tmp_path):
    donor = _randomize(_detector("FrozenBN"))
    path = tmp_path / "maskrcnn.pth"
    torch.save(donor.state_dict(), path)  # torchvision-style: no config, no sidecar; norm from running statistics
    model = _detector("FrozenBN")
    meta = load_init(model, str(path), depth=18, norm="FrozenBN")
    for k, v in donor.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert meta["format"] == "detector-state-dict" and meta["norm"] == "BN" and meta["loaded_parts"] == PARTS
    trunk = _detector("FrozenBN").backbone.body  # load_backbone, too, finds the trunk in a detector's file
    assert load_backbone(trunk, str(path), depth=18, norm="FrozenBN")["missing"] == []
    assert torch.equal(trunk.layer4[1].conv2.weight, donor.backbone.body.layer4[1].conv2.weight)


def test_trunk_sources_through_load_init_say_what_was_loaded(tmp_path):
    donor = _randomize(_detector("GN")).backbone.body
    path = tmp_path / "trunk.pth"
    torch.save(donor.state_dict(), path)
    model = _detector("GN")
    meta = load_init(model, str(path), depth=18, norm="GN")
    assert meta["loaded_parts"] == ["trunk"] and meta["init_parts"] == PARTS[1:]
    assert torch.equal(model.backbone.body.conv1.weight, donor.conv1.weight)


def test_weights_matching_nothing_are_an_error(tmp_path):
    path = tmp_path / "ddp.pth"
    state = {"module." + k: v for k, v in _detector("GN").state_dict().items()}
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"no tensor in the file matches the model \(a DistributedDataParallel "
                                           rf"'module.' prefix\?\): the file has {len(state)} tensors named like "
                                           r"module.backbone.*the model expects names like conv1.weight.* \(or, for a whole "
                                           r"detector, backbone.body.conv1.weight"):
        load_init(_detector("GN"), str(path), depth=18, norm="GN")
    with pytest.raises(WeightsError, match=r"no tensor in the file matches the model.*expects names like conv1.weight"):
        load_backbone(_detector("GN").backbone.body, str(path), depth=18, norm="GN")


def test_detector_shape_mismatch_outside_the_class_layers_is_an_error(tmp_path):
    path = _save_run_checkpoint(tmp_path / "model_final.pth", _detector("GN", box_head_fc_dim=128))
    fc = load_config(None, TINY_MODEL).model.box_head_num_conv + 1  # the head's convs, then flatten, then its fc
    with pytest.raises(WeightsError, match=rf"roi_heads.box_head.{fc}.weight has shape \(128, 1568\), the model "
                                           r"expects \(64, 1568\)"):
        load_init(_detector("GN"), str(path), depth=18, norm="GN")


def test_corrupt_checkpoint_is_refused_by_its_checksum(tmp_path):
    path = _save_run_checkpoint(tmp_path / "model_final.pth", _detector("GN"))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_init(_detector("GN"), str(tmp_path), depth=18, norm="GN")
