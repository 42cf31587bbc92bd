import pytest
import torch
from torch import nn

from scratchdet.config import load_config
from scratchdet.model import build_model, count_parameters, get_norm, model_kwargs, norm_layers

from .conftest import TINY_MODEL


def test_paper_preset_is_groupnorm_everywhere_and_all_trainable():
    cfg = load_config("mask_rcnn_R50_FPN_GN_scratch_6x")
    model = build_model(**model_kwargs(cfg.model))
    norms = norm_layers(model)
    assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for _, m in norms)
    # GN in each of the four places the paper puts it.
    for part in ("backbone.body.", "backbone.fpn.", "roi_heads.box_head.", "roi_heads.mask_head."):
        assert any(n.startswith(part) for n, _ in norms), part
    total, trainable = count_parameters(model)
    assert total == trainable > 40_000_000
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("norm, cls", [("BN", nn.BatchNorm2d), ("SyncBN", nn.SyncBatchNorm)])
def test_one_switch_sets_every_norm(norm, cls):
    cfg = load_config(None, TINY_MODEL + [f"model.norm={norm}"])
    model = build_model(**model_kwargs(cfg.model, 3))
    norms = norm_layers(model)
    assert norms and all(type(m) is cls for _, m in norms)
    assert any(n.startswith("roi_heads.mask_head.") for n, _ in norms)


def test_norm_none_has_no_norm_and_biased_convs():
    cfg = load_config(None, TINY_MODEL + ["model.norm=none"])
    model = build_model(**model_kwargs(cfg.model, 3))
    assert norm_layers(model) == []
    convs = [m for m in model.backbone.body.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)


def test_get_norm_rejects_indivisible_groups():
    with pytest.raises(ValueError, match="gn_groups"):
        get_norm("GN", 48, gn_groups=32)


@pytest.mark.parametrize("depth, groups, wpg, channels", [(18, 1, 64, 512), (34, 1, 64, 512), (101, 32, 8, 2048)])
def test_depths_and_resnext(depth, groups, wpg, channels):
    from scratchdet.model import ResNet

    trunk = ResNet(depth=depth, groups=groups, width_per_group=wpg, norm="GN")
    assert trunk.out_channels[-1] == channels
    if groups > 1:
        assert trunk.layer1[0].conv2.groups == 32 and trunk.layer1[0].conv2.out_channels == 256


def test_msra_init_statistics():
    from scratchdet.model import ResNet

    torch.manual_seed(0)
    trunk = ResNet(depth=50, norm="GN")
    w = trunk.layer3[0].conv2.weight  # 3x3, 256 -> 256: fan_out = 256 * 9
    assert w.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)
    assert torch.all(trunk.layer3[0].bn3.weight == 1)


def test_zero_init_residual_option():
    from scratchdet.model import ResNet

    trunk = ResNet(depth=50, norm="GN", zero_init_residual=True)
    assert torch.all(trunk.layer2[1].bn3.weight == 0)


def test_train_step_and_inference_shapes():
    torch.manual_seed(0)
    cfg = load_config(None, TINY_MODEL)
    model = build_model(**model_kwargs(cfg.model, 3))
    images = [torch.rand(3, 64, 96) * 255, torch.rand(3, 96, 64) * 255]
    masks = torch.zeros(1, 64, 96, dtype=torch.uint8)
    masks[0, 10:30, 20:50] = 1
    targets = [{"boxes": torch.tensor([[20.0, 10, 50, 30]]), "labels": torch.tensor([2]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 96, 64, dtype=torch.uint8)}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "mask" in n)
    model.eval()
    out = model(images)
    assert out[0]["masks"].shape[1:] == (1, 28, 28)
    assert (out[0]["boxes"][:, 2] <= 96).all()


def test_groupnorm_runs_in_fp32_under_autocast():
    norm = get_norm("GN", 64, gn_groups=32)
    x = torch.randn(2, 64, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    expected = nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps)
    assert torch.allclose(y.float(), expected, atol=1e-2)
