from collections import OrderedDict
from dataclasses import replace

import pytest
import torch
from torch import nn

from scratchdet.config import load_config
from scratchdet.model import build_model, count_parameters
from scratchdet.norm import NORM_TYPES, SyncBatchNorm, get_norm, norm_layers

from .conftest import TINY_MODEL


def test_paper_preset_is_groupnorm_everywhere_and_all_trainable():
    cfg = load_config("mask_rcnn_R50_FPN_GN_scratch_6x")
    model = build_model(cfg.model)
    norms = norm_layers(model)
    assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for _, m in norms)
    # GN in each of the four places the paper puts it.
    for part in ("backbone.body.", "backbone.fpn.", "roi_heads.box_head.", "roi_heads.mask_head."):
        assert any(n.startswith(part) for n, _ in norms), part
    total, trainable = count_parameters(model)
    assert total == trainable > 40_000_000
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("norm, cls", [("BN", nn.BatchNorm2d), ("SyncBN", SyncBatchNorm)])
def test_one_switch_sets_every_norm(norm, cls):
    cfg = load_config(None, TINY_MODEL + [f"model.norm={norm}"])
    model = build_model(cfg.model, num_classes=3)
    norms = norm_layers(model)
    assert norms and all(type(m) is cls for _, m in norms)
    assert any(n.startswith("roi_heads.mask_head.") for n, _ in norms)


def test_norm_none_has_no_norm_and_biased_convs():
    cfg = load_config(None, TINY_MODEL + ["model.norm=none"])
    model = build_model(cfg.model, num_classes=3)
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
    # A 1x1 256 -> 1024 conv, where fan-out (1024) and fan-in (256) differ by 4x: MSRA's fan_out
    # mode gives std sqrt(2/1024); fan_in mode would give twice that.
    w = trunk.layer3[0].conv3.weight
    assert tuple(w.shape) == (1024, 256, 1, 1)
    assert w.std().item() == pytest.approx((2 / 1024) ** 0.5, rel=0.05)
    assert torch.all(trunk.layer3[0].bn3.weight == 1)


def test_head_init_follows_detectron2():
    torch.manual_seed(0)
    cfg = load_config(None, TINY_MODEL)
    model = build_model(cfg.model, num_classes=3)
    # Mask head's transposed conv: MSRA fill (fan_out of a ConvTranspose2d weight [in, out, k, k] is
    # in * k * k, as detectron2's c2_msra_fill computes it), bias 0 (torchvision leaves it random).
    deconv = model.roi_heads.mask_predictor.conv5_mask
    fan = deconv.weight.shape[0] * 4
    assert deconv.weight.std().item() == pytest.approx((2 / fan) ** 0.5, rel=0.1)
    assert torch.all(deconv.bias == 0)
    # Box head fc: Caffe2's XavierFill, uniform in +-sqrt(3 / fan_in), bias 0 (PyTorch's default is
    # +-sqrt(1 / fan_in)).
    fc = [m for m in model.roi_heads.box_head if isinstance(m, nn.Linear)]
    assert len(fc) == 1
    bound = (3 / fc[0].in_features) ** 0.5
    assert fc[0].weight.abs().max().item() <= bound
    assert fc[0].weight.abs().max().item() > 0.95 * bound
    assert torch.all(fc[0].bias == 0)


def test_zero_init_residual_option():
    from scratchdet.model import ResNet

    trunk = ResNet(depth=50, norm="GN", zero_init_residual=True)
    assert torch.all(trunk.layer2[1].bn3.weight == 0)


def test_train_step_and_inference_shapes():
    torch.manual_seed(0)
    cfg = load_config(None, TINY_MODEL)
    model = build_model(cfg.model, num_classes=3)
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


@pytest.mark.parametrize("seed", range(4))
def test_groupnorm_runs_in_fp32_under_autocast(seed):
    torch.manual_seed(seed)
    norm = get_norm("GN", 64, gn_groups=32)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    # A large mean over small groups: statistics computed in bf16 lose most of the variance.
    x = (torch.randn(2, 64, 8, 8) * 0.1 + 30).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    # Exactly the fp32 computation, rounded once to bf16 at the end, on every device.  (On this CPU a
    # plain GroupNorm with fp32 parameters also computes in fp32 internally, in another order: it
    # lands up to one bf16 step away and fails this; statistics in bf16 are 20 to 55 steps off.)
    expected = nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).bfloat16()
    assert torch.equal(y, expected)


def _tiny_detector(**extra):
    cfg = load_config(None, TINY_MODEL + ["model.score_thresh_test=0.0"])
    return build_model(replace(cfg.model, **extra), num_classes=3)


def test_boxes_stay_fp32_and_unquantized_under_bf16_autocast():
    # bf16 has an 8-bit mantissa: above 512 px a bf16 coordinate is a multiple of 4.  Anchors,
    # proposals, final boxes, scores and mask probabilities must all be fp32 (as detectron2).
    torch.manual_seed(0)
    model = _tiny_detector().eval()
    seen = {}
    model.rpn.anchor_generator.register_forward_hook(lambda m, i, o: seen.__setitem__("anchors", o[0]))
    model.rpn.register_forward_hook(lambda m, i, o: seen.__setitem__("proposals", o[0][0]))
    images = [torch.rand(3, 800, 1216) * 255]  # a COCO-size input
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)[0]
    assert seen["anchors"].dtype == seen["proposals"].dtype == torch.float32
    for name in ("boxes", "scores", "masks"):
        assert out[name].dtype == torch.float32, name
    for name, boxes in (("proposals", seen["proposals"]), ("boxes", out["boxes"])):
        far = boxes[boxes > 512]
        assert len(far) > 20, name
        assert (far % 4 != 0).float().mean() > 0.5, f"{name} quantized to multiples of 4"


def test_training_losses_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = _tiny_detector()
    masks = torch.zeros(1, 96, 128, dtype=torch.uint8)
    masks[0, 10:40, 20:70] = 1
    targets = [{"boxes": torch.tensor([[20.0, 10, 70, 40]]), "labels": torch.tensor([1]), "masks": masks}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([torch.rand(3, 96, 128) * 255], targets)
    assert all(v.dtype == torch.float32 for v in losses.values()), {k: v.dtype for k, v in losses.items()}


@pytest.mark.parametrize("norm", ["BN", "SyncBN"])
def test_freeze_at_freezes_weights_and_statistics(norm):
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = _tiny_detector(norm=norm, freeze_at=2)
    body = model.backbone.body
    frozen = [body.bn1] + [m for m in body.layer1.modules() if isinstance(m, NORM_TYPES)]
    live = [m for m in body.layer2.modules() if isinstance(m, NORM_TYPES)]
    assert frozen and all(type(m) is FrozenBatchNorm2d for m in frozen)
    assert live and all(type(m) is not FrozenBatchNorm2d for m in live)
    before = {k: v.clone() for k, v in body.state_dict().items()}
    model.train()
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 10:40] = 1
    target = {"boxes": torch.tensor([[10.0, 10, 40, 40]]), "labels": torch.tensor([1]), "masks": masks}
    for _ in range(2):
        model([torch.rand(3, 64, 64) * 255, torch.rand(3, 64, 64) * 255], [target, target])
    after = body.state_dict()
    for k in before:
        if k.startswith(("conv1.", "bn1.", "layer1.")):
            assert torch.equal(before[k], after[k]), f"{k} changed in a frozen stage"
    assert not torch.equal(before["layer2.0.bn1.running_mean"], after["layer2.0.bn1.running_mean"])
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())


def test_resnext_widths_with_basic_blocks_are_an_error():
    from scratchdet.config import ConfigError
    from scratchdet.model import ResNet

    with pytest.raises(ValueError, match="basic blocks"):
        ResNet(depth=18, groups=32, width_per_group=8)
    for override in ("model.groups=32", "model.width_per_group=8"):
        with pytest.raises(ConfigError, match="model.groups.*basic blocks"):
            load_config(None, ["model.depth=34", override])
    assert load_config(None, ["model.depth=50", "model.groups=32", "model.width_per_group=8"]).model.groups == 32


def _fpn_features(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((str(i), torch.randn(2, 8, 64 // 2**i, 80 // 2**i, generator=g).to(dtype)) for i in range(4))


def _boxes(seed, n):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([300.0, 240.0])
    wh = torch.rand(n, 2, generator=g) ** 2 * 250 + 1  # 1 px to 250 px
    big = torch.tensor([[10.0, 10, 490, 470], [0, 0, 320, 250]])  # for the coarsest levels
    return torch.cat([torch.cat([xy, xy + wh], 1), big])


@pytest.mark.parametrize("ratio", [2, 0])  # gathers (a fixed ratio), torchvision's kernel in threads (adaptive)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parallel_roi_pool_matches_torchvision(dtype, ratio):
    from torchvision.ops import MultiScaleRoIAlign

    from scratchdet.cpu_ops import ParallelRoIPool

    torch.set_num_threads(2)  # the parallel path needs at least 2 threads
    ours, stock = (cls(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=ratio)
                   for cls in (ParallelRoIPool, MultiScaleRoIAlign))
    shapes = [(256, 320), (256, 320)]
    boxes = [_boxes(1, 37), _boxes(2, 23)]
    feats = [_fpn_features(0, dtype) for _ in range(2)]
    for f in feats:
        for v in f.values():
            v.requires_grad_(True)
    grad_out = torch.randn(64, 8, 7, 7, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        a, b = ours(feats[0], boxes, shapes), stock(feats[1], boxes, shapes)
    assert a.dtype == b.dtype == dtype
    assert torch.equal(a, b)  # the forward is the same arithmetic on the same RoIs: bit for bit
    (a.float() * grad_out).sum().backward()
    (b.float() * grad_out).sum().backward()
    reached = 0
    for k in feats[0]:  # the adaptive path sums two chunks' partial gradients: float order only
        got, want = (f[k].grad if f[k].grad is not None else torch.zeros_like(f[k]) for f in feats)
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-6)
        reached += bool(want.abs().sum() > 0)
    assert reached == 4  # RoIs on every level


def _edge_rois(seed: int, n: int, image_hw: tuple[int, int]) -> torch.Tensor:
    """[n + 8, 5] RoIs over 2 images: random boxes spilling past every border, and edge cases."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 1.4, h * 1.4]) - torch.tensor([w * 0.2, h * 0.2])
    wh = torch.rand(n, 2, generator=g) ** 2 * torch.tensor([w * 0.8, h * 0.8])  # down to a fraction of a pixel
    edge = torch.tensor([
        [0.0, 0, w, h],  # the whole image: samples on the last row and column (clamped)
        [-3 * w, -3 * h, -w, -h],  # wholly outside, above and left: every sample counts for nothing
        [w + 5, h + 5, 3 * w, 3 * h],  # wholly outside, below and right
        [-40, -40, w / 2, h / 2],  # samples more than one cell before the map's start
        [w - 2, h - 2, w + 60, h + 60],  # ... and past its end
        [5, 5, 5, 5],  # empty: RoIAlign's minimum size of one cell
        [w - 1e-3, 3, w, 9],  # a sliver at the right border
        [-4, -4, 0, 0],  # within one cell before the start: clamped to row and column 0
    ])
    boxes = torch.cat([torch.cat([xy, xy + wh], 1), edge])
    batch = torch.arange(len(boxes)).remainder(2).float()[:, None]
    return torch.cat([batch, boxes], 1)


@pytest.mark.parametrize("ratio", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_gather_roi_align_equals_torchvision_roi_align(ratio, channels_last, chunk_bytes, monkeypatch):
    import platform

    from torchvision.ops import roi_align

    from scratchdet import cpu_ops as m

    if chunk_bytes is not None:
        monkeypatch.setattr(m, "_GATHER_CHUNK_BYTES", chunk_bytes)  # one RoI per chunk: every chunk boundary
    g = torch.Generator().manual_seed(ratio)
    image_hw, size, scales = (96, 80), (7, 5), (1 / 4, 1 / 8, 1 / 32)
    feats = [torch.randn(2, 6, 96 // round(1 / s), 80 // round(1 / s), generator=g) for s in scales]  # 24x20 .. 3x2
    if channels_last:
        feats = [f.to(memory_format=torch.channels_last) for f in feats]
    rois = _edge_rois(ratio, 60, image_hw)
    levels = torch.randint(0, len(feats), (len(rois),), generator=g)
    grad_out = torch.randn(len(rois), 6, *size, generator=g)
    grad_out[len(rois) - 7:len(rois) - 5] = float("inf")  # RoIs wholly outside: their gradient reaches no pixel

    ours_in = [f.clone().requires_grad_(True) for f in feats]
    ours = m._GatherRoIAlign.apply(rois, levels, scales, size, ratio, *ours_in)
    ours.backward(grad_out)
    stock_in = [f.clone().requires_grad_(True) for f in feats]
    stock = torch.zeros_like(ours)
    for level, (f, scale) in enumerate(zip(stock_in, scales)):
        idx = torch.where(levels == level)[0]
        stock[idx] = roi_align(f, rois[idx], size, scale, ratio, aligned=False)
    stock.backward(grad_out)

    assert ours.shape == stock.shape and ours.dtype == stock.dtype
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert (ours == 0).all(1).flatten(1).all(1)[len(rois) - 7:len(rois) - 5].all()  # the two RoIs wholly outside
    torch.testing.assert_close(ours, stock)
    for a, b in zip(ours_in, stock_in):
        torch.testing.assert_close(a.grad, b.grad)
        assert a.grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if platform.machine() in ("x86_64", "AMD64"):
        # The kernel's fp32 operations in its order: the same bits (where its build contracts no FMAs).
        assert torch.equal(ours, stock)
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours_in, stock_in))

    one = m._GatherRoIAlign.apply(rois, None, scales[:1], size, ratio, feats[0])  # one level: no level index
    torch.testing.assert_close(one, roi_align(feats[0], rois, size, scales[0], ratio, aligned=False))


def test_parallel_rpn_filters_proposals_like_torchvision():
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from scratchdet.cpu_ops import ParallelRPN

    torch.set_num_threads(2)
    model = _tiny_detector()
    args = (model.rpn.anchor_generator, model.rpn.head, 0.7, 0.3, 64, 0.5, {"training": 50, "testing": 30},
            {"training": 40, "testing": 20}, 0.7)
    ours, stock = ParallelRPN(*args), RegionProposalNetwork(*args)
    g = torch.Generator().manual_seed(0)
    counts = [300, 120, 40, 12]
    n = sum(counts)
    xy = torch.rand(3, n, 2, generator=g) * 200 - 20
    proposals = torch.cat([xy, xy + torch.rand(3, n, 2, generator=g) * 80], 2)
    objectness = torch.randn(3 * n, 1, generator=g)
    shapes = [(160, 200), (150, 210), (160, 160)]
    for training in (True, False):
        ours.train(training)
        stock.train(training)
        got = ours.filter_proposals(proposals, objectness, shapes, counts)
        want = stock.filter_proposals(proposals, objectness, shapes, counts)
        for g_list, w_list in zip(got, want):
            assert len(g_list) == 3 and all(torch.equal(x, y) for x, y in zip(g_list, w_list))
        assert len(got[0][0]) == (40 if training else 20)


@pytest.mark.parametrize("task", ["masks", "keypoints"])
def test_roi_sampling_ratio_reaches_every_pooler(task):
    from scratchdet.cpu_ops import ParallelRoIPool

    for ratio in (1, 2):
        cfg = load_config(None, TINY_MODEL + [f"model.roi_sampling_ratio={ratio}", f"model.task={task}",
                                              "model.num_keypoints=4", "data.synth.keypoints=true"])
        model = build_model(cfg.model, num_classes=3)
        pools = [m for m in model.modules() if isinstance(m, ParallelRoIPool)]
        assert len(pools) == 2 and {p.sampling_ratio for p in pools} == {ratio}
