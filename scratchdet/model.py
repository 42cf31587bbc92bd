"""Mask R-CNN with a ResNet/ResNeXt-FPN backbone, built from torchvision's detection parts.

Every normalization layer (backbone, FPN, box head, mask head) comes from one ``get_norm``,
chosen by one string: the paper's point is that normalization must be right in *every* layer
for training from scratch (Sec. 3.1, "Normalization").  Nothing converts norm layers after
the model is built.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

NORMS = ("GN", "SyncBN", "BN", "FrozenBN", "none")
NORM_TYPES = (nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)


# --------------------------------------------------------------------------- norm


class FP32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 under autocast (bf16/fp16 statistics over small groups lose
    precision); returns the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


def get_norm(norm: str, channels: int, *, gn_groups: int = 32) -> nn.Module:
    """The one normalization switch (detectron2's ``get_norm``): a layer for ``channels``."""
    if norm == "GN":
        if channels % gn_groups:
            raise ValueError(f"GroupNorm: {channels} channels do not divide into model.gn_groups={gn_groups}")
        return FP32GroupNorm(gn_groups, channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


def norm_factory(norm: str, *, gn_groups: int = 32) -> Callable[[int], nn.Module] | None:
    """``get_norm`` bound to a norm name, in the ``norm_layer(channels)`` form torchvision takes.

    ``None`` for "none" (torchvision then gives its convs a bias).  FrozenBN applies to the
    backbone only: FPN and heads are new layers without pretrained statistics to freeze, so
    they get no norm, as in Detectron's FrozenBN baselines.
    """
    if norm in ("none", "FrozenBN"):
        return None
    return partial(get_norm, norm, gn_groups=gn_groups)


# --------------------------------------------------------------------------- init


def msra_fill_(module: nn.Module) -> None:
    """He et al.'s MSRA init of every conv (fan_out, ReLU gain), biases 0; norms to identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def normal_fill_(module: nn.Module, std: float) -> None:
    """Gaussian init of the weights of every conv and fc layer, biases 0 (Detectron's predictors)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def xavier_fill_(module: nn.Module) -> None:
    """Caffe2's XavierFill (uniform, a=1) for FPN convs, as Detectron and torchvision do."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- backbone


def conv(cin: int, cout: int, k: int, *, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Attribute names match torchvision's, so its weights load."""

    expansion = 1

    def __init__(self, *, cin: int, planes: int, stride: int, groups: int, width_per_group: int, norm: Callable,
                 stride_in_1x1: bool = False) -> None:
        super().__init__()
        bias = isinstance(norm(planes), nn.Identity)
        self.conv1 = conv(cin, planes, 3, stride=stride, bias=bias)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, bias=bias)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 block; the stride on the 3x3 (torchvision's "ResNet v1.5") or, with
    ``stride_in_1x1``, on the 1x1 (Detectron's MSRA/Caffe2 ImageNet models)."""

    expansion = 4

    def __init__(self, *, cin: int, planes: int, stride: int, groups: int, width_per_group: int, norm: Callable,
                 stride_in_1x1: bool = False) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        bias = isinstance(norm(planes), nn.Identity)
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv(cin, width, 1, stride=s1, bias=bias)
        self.bn1 = norm(width)
        self.conv2 = conv(width, width, 3, stride=s3, groups=groups, bias=bias)
        self.bn2 = norm(width)
        self.conv3 = conv(width, planes * 4, 1, bias=bias)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes * 4, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(cin: int, cout: int, stride: int, norm: Callable) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    bias = isinstance(norm(cout), nn.Identity)
    return nn.Sequential(conv(cin, cout, 1, stride=stride, bias=bias), norm(cout))


STAGES = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3)),
          101: (Bottleneck, (3, 4, 23, 3)), 152: (Bottleneck, (3, 8, 36, 3))}


class ResNet(nn.Module):
    """ResNet/ResNeXt trunk returning res2..res5 (strides 4..32); names follow torchvision's."""

    def __init__(
        self,
        *,
        depth: int = 50,
        groups: int = 1,
        width_per_group: int = 64,
        stem_channels: int = 64,
        base_width: int = 64,
        norm: str = "GN",
        gn_groups: int = 32,
        zero_init_residual: bool = False,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        if depth not in STAGES:
            raise ValueError(f"ResNet depth {depth} is not one of {sorted(STAGES)}")
        block, counts = STAGES[depth]
        make_norm = partial(get_norm, norm, gn_groups=gn_groups)
        self.conv1 = conv(3, stem_channels, 7, stride=2, bias=norm == "none")
        self.bn1 = make_norm(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = stem_channels
        self.out_channels: list[int] = []
        for i, n in enumerate(counts):
            planes = base_width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (j == 0 and i > 0) else 1
                blocks.append(block(cin=cin, planes=planes, stride=stride, groups=groups,
                                    width_per_group=width_per_group, norm=make_norm, stride_in_1x1=stride_in_1x1))
                cin = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(cin)
        msra_fill_(self)
        if zero_init_residual:
            # Goyal et al. 2017, Sec. 5.1: each residual branch starts as zero, each block as identity.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and hasattr(m.last_norm(), "weight"):
                    nn.init.zeros_(m.last_norm().weight)

    def freeze(self, freeze_at: int) -> None:
        """Freeze the stem (1) and res2..res``freeze_at`` (Detectron's FREEZE_AT) for fine-tuning."""
        stages = [[self.conv1, self.bn1]] + [[getattr(self, f"layer{i}")] for i in range(1, 5)]
        for stage in stages[:freeze_at]:
            for m in stage:
                for p in m.parameters():
                    p.requires_grad_(False)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """x: [B, 3, H, W] -> {"layer1".."layer4": [B, C_i, H/2^(i+1), W/2^(i+1)]}."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            out[name] = x
        return out


# --------------------------------------------------------------------------- detector


class BatchOnlyTransform(GeneralizedRCNNTransform):
    """Normalize and pad to a batch; no resize and no mask pasting.

    Resizing happens in the data pipeline (``torchvision.transforms.v2``, in the loader's
    workers), so the model's own resize would only interpolate again.  Pasting 28x28 masks into
    full images is left to ``paste_detections``, which pastes at the *original* image size
    one image at a time rather than at the network's input size for the whole batch.
    """

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, Any]:
        return image, target

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: Any, original_image_sizes: Any) -> Any:
        return result


def build_model(
    *,
    num_classes: int,
    depth: int = 50,
    groups: int = 1,
    width_per_group: int = 64,
    stem_channels: int = 64,
    base_width: int = 64,
    norm: str = "GN",
    gn_groups: int = 32,
    zero_init_residual: bool = False,
    stride_in_1x1: bool = False,
    freeze_at: int = 0,
    fpn_channels: int = 256,
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
    anchor_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    rpn_batch_size_per_image: int = 256,
    rpn_pre_nms_topk_train: int = 2000,
    rpn_post_nms_topk_train: int = 2000,
    rpn_pre_nms_topk_test: int = 1000,
    rpn_post_nms_topk_test: int = 1000,
    box_head_num_conv: int = 4,
    box_head_conv_dim: int = 256,
    box_head_fc_dim: int = 1024,
    mask_head_num_conv: int = 4,
    mask_head_conv_dim: int = 256,
    roi_batch_size_per_image: int = 512,
    roi_positive_fraction: float = 0.25,
    score_thresh_test: float = 0.05,
    nms_thresh_test: float = 0.5,
    detections_per_image: int = 100,
    pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53),
    pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375),
) -> MaskRCNN:
    """Mask R-CNN, FPN P2-P6, 4conv1fc box head, 4-conv mask head; ``num_classes`` excludes background.

    Input: list of float images [3, H, W] in 0-255 RGB.  Training returns the loss dict; inference
    returns per image ``boxes`` [N, 4] (xyxy, input pixels), ``labels`` [N], ``scores`` [N] and
    ``masks`` [N, 1, 28, 28] probabilities (paste them with ``paste_detections``).
    """
    trunk = ResNet(depth=depth, groups=groups, width_per_group=width_per_group, stem_channels=stem_channels,
                   base_width=base_width, norm=norm, gn_groups=gn_groups, zero_init_residual=zero_init_residual,
                   stride_in_1x1=stride_in_1x1)
    head_norm = norm_factory(norm, gn_groups=gn_groups)
    backbone = BackboneWithFPN(
        trunk,
        return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
        in_channels_list=trunk.out_channels,
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),  # P6 = max-pool of P5, for the RPN only (as Detectron)
        norm_layer=head_norm,
    )
    xavier_fill_(backbone.fpn)
    trunk.freeze(freeze_at)
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), (tuple(anchor_aspect_ratios),) * len(anchor_sizes))
    rpn_head = RPNHead(fpn_channels, anchors.num_anchors_per_location()[0])
    normal_fill_(rpn_head, std=0.01)
    box_head = FastRCNNConvFCHead((fpn_channels, 7, 7), [box_head_conv_dim] * box_head_num_conv, [box_head_fc_dim],
                                  norm_layer=head_norm)
    msra_fill_(box_head)
    box_predictor = FastRCNNPredictor(box_head_fc_dim, num_classes + 1)
    normal_fill_(box_predictor.cls_score, std=0.01)
    normal_fill_(box_predictor.bbox_pred, std=0.001)
    mask_head = MaskRCNNHeads(fpn_channels, [mask_head_conv_dim] * mask_head_num_conv, 1, norm_layer=head_norm)
    msra_fill_(mask_head)
    mask_predictor = MaskRCNNPredictor(mask_head_conv_dim, mask_head_conv_dim, num_classes + 1)
    msra_fill_(mask_predictor.conv5_mask)
    normal_fill_(mask_predictor.mask_fcn_logits, std=0.001)
    model = MaskRCNN(
        backbone,
        num_classes=None,
        image_mean=list(pixel_mean),
        image_std=list(pixel_std),
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=rpn_pre_nms_topk_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_topk_test,
        rpn_post_nms_top_n_train=rpn_post_nms_topk_train,
        rpn_post_nms_top_n_test=rpn_post_nms_topk_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_head=box_head,
        box_predictor=box_predictor,
        box_score_thresh=score_thresh_test,
        box_nms_thresh=nms_thresh_test,
        box_detections_per_img=detections_per_image,
        box_batch_size_per_image=roi_batch_size_per_image,
        box_positive_fraction=roi_positive_fraction,
        mask_head=mask_head,
        mask_predictor=mask_predictor,
    )
    model.transform = BatchOnlyTransform(1, 1, list(pixel_mean), list(pixel_std), size_divisible=32)
    return model


def model_kwargs(model_cfg: Any, num_classes: int | None = None) -> dict[str, Any]:
    """The one translation from ``ModelConfig`` to ``build_model`` arguments.

    ``num_classes`` is the training set's; ``model.num_classes`` (when not 0) must agree with it.
    """
    kwargs = {k: v for k, v in vars(model_cfg).items() if k not in ("init", "num_classes")}
    for k in ("anchor_sizes", "anchor_aspect_ratios", "pixel_mean", "pixel_std"):
        kwargs[k] = tuple(kwargs[k])
    if model_cfg.num_classes and num_classes and model_cfg.num_classes != num_classes:
        raise ValueError(f"model.num_classes={model_cfg.num_classes} but the training set has {num_classes} categories")
    n = num_classes or model_cfg.num_classes
    if not n:
        raise ValueError("model.num_classes: unknown without a training set; set it (80 for COCO)")
    return {"num_classes": n, **kwargs}


TRUNK_KEYS = ("depth", "groups", "width_per_group", "stem_channels", "base_width", "norm", "gn_groups",
              "zero_init_residual", "stride_in_1x1")


def trunk_kwargs(model_cfg: Any) -> dict[str, Any]:
    """The ``ResNet`` arguments of a ``ModelConfig`` (for ``scratchdet pretrain``'s classifier)."""
    return {k: getattr(model_cfg, k) for k in TRUNK_KEYS}


def paste_detections(
    output: dict[str, Tensor], input_hw: tuple[int, int], orig_hw: tuple[int, int], mask_threshold: float = 0.5
) -> dict[str, Tensor]:
    """Map one image's detections from network-input to original pixels.

    Returns ``boxes`` [N, 4] xyxy and ``masks`` [N, H0, W0] bool at the original resolution.
    """
    (h, w), (h0, w0) = input_hw, orig_hw
    scale = torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h], dtype=output["boxes"].dtype, device=output["boxes"].device)
    boxes = output["boxes"] * scale
    result = {"boxes": boxes, "labels": output["labels"], "scores": output["scores"]}
    if "masks" in output:
        if len(boxes):
            masks = paste_masks_in_image(output["masks"], boxes, (h0, w0), padding=1)[:, 0] >= mask_threshold
        else:
            masks = torch.zeros((0, h0, w0), dtype=torch.bool, device=boxes.device)
        result["masks"] = masks
    return result


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every normalization layer of the model, by name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]
