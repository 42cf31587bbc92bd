"""Mask R-CNN with a ResNet/ResNeXt-FPN backbone, built from torchvision's detection parts.

Every normalization layer (backbone, FPN, box head, mask head) comes from one ``norm.get_norm``,
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
from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import Conv2dNormActivation

from .config import ModelConfig
from .cpu_ops import ParallelRoIPool, ParallelRPN
from .layers import (
    FP32BoxPredictor,
    SeededSampler,
    autocast_off,
    msra_fill_,
    normal_fill_,
    use_mask_target_roi_align,
    xavier_fill_,
)
from .norm import get_norm, norm_factory

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


def block_kind(depth: int) -> type:
    return STAGES[depth][0]


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
        freeze_at: int = 0,
    ) -> None:
        super().__init__()
        if depth not in STAGES:
            raise ValueError(f"ResNet depth {depth} is not one of {sorted(STAGES)}")
        if block_kind(depth) is BasicBlock and (groups != 1 or width_per_group != 64):
            raise ValueError(f"groups={groups}, width_per_group={width_per_group}: depth {depth} has basic blocks, "
                             "which have no grouped conv (ResNeXt needs depth 50, 101 or 152)")
        block, counts = STAGES[depth]

        def stage_norm(stage: int) -> Callable[[int], nn.Module]:
            # A frozen stage (stem = 1, res2 = 2, ...) keeps frozen statistics too: BN in train mode
            # would go on updating running statistics of layers whose weights do not learn
            # (detectron2 makes frozen stages FrozenBatchNorm2d for the same reason).
            frozen = stage <= freeze_at and norm in ("BN", "SyncBN")
            return partial(get_norm, "FrozenBN" if frozen else norm, gn_groups=gn_groups)

        self.conv1 = conv(3, stem_channels, 7, stride=2, bias=norm == "none")
        self.bn1 = stage_norm(1)(stem_channels)
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
                                    width_per_group=width_per_group, norm=stage_norm(i + 2),
                                    stride_in_1x1=stride_in_1x1))
                cin = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(cin)
        msra_fill_(self)
        if zero_init_residual:
            # Goyal et al. 2017, Sec. 5.1: each residual branch starts as zero, each block as identity.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and hasattr(m.last_norm(), "weight"):
                    nn.init.zeros_(m.last_norm().weight)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Freeze the weights of the stem (1) and res2..res``freeze_at`` (Detectron's FREEZE_AT) for
        fine-tuning; their BN-family norms are already FrozenBatchNorm2d (built so in ``__init__``)."""
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


# --------------------------------------------------------------------------- fp32 boxes under autocast
#
# Under torch.autocast, torchvision's heads return bf16/fp16 outputs and its box decoding runs in
# the dtype of the deltas (BoxCoder casts the reference boxes to it), as does AnchorGenerator
# (anchors take the feature maps' dtype).  bf16 keeps 8 bits of mantissa: above 512 px every
# anchor, proposal and final box coordinate is a multiple of 4.  As detectron2 does, the
# predictors' outputs and everything decoded from them stay fp32 whatever the autocast dtype;
# only the heavy convolutions run in low precision.  Subclasses (not wrappers) keep
# torchvision's parameter names, so state dicts load unchanged.


class FP32AnchorGenerator(AnchorGenerator):
    """Anchors in fp32 whatever the features' dtype (only their sizes are read)."""

    def forward(self, image_list: Any, feature_maps: list[Tensor]) -> list[Tensor]:
        shapes = [torch.empty((0, *f.shape[-2:]), dtype=torch.float32, device=f.device) for f in feature_maps]
        return super().forward(image_list, shapes)


class FP32RPNHead(RPNHead):
    """RPN head whose 3x3 conv runs under autocast and whose objectness and delta predictors run in fp32."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in x:
            t = self.conv(feature)
            with autocast_off(t):
                t = t.float()
                logits.append(self.cls_logits(t))
                deltas.append(self.bbox_pred(t))
        return logits, deltas


class FP32KeypointPredictor(KeypointRCNNPredictor):
    """Keypoint heatmap logits (transposed conv, then 2x bilinear upsampling) in fp32."""

    def forward(self, x: Tensor) -> Tensor:
        with autocast_off(x):
            # Contiguous: torchvision's keypointrcnn_loss views the logits as [N * K, H * W], which a channels-last
            # tensor (train.channels_last) cannot give.
            return super().forward(x.float()).contiguous()


class FP32MaskPredictor(MaskRCNNPredictor):
    """Transposed conv under autocast, mask logits in fp32 (so mask probabilities are fp32)."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv5_mask(x))
        with autocast_off(x):
            return self.mask_fcn_logits(x.float())


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


def build_model(cfg: ModelConfig, *, num_classes: int | None = None, num_keypoints: int | None = None) -> FasterRCNN:
    """Mask R-CNN (``cfg.task`` masks), Faster R-CNN (boxes) or Keypoint R-CNN (keypoints): FPN P2-P6,
    4conv1fc box head (or a cascade of them), 4-conv mask head, 8-conv keypoint head, every one
    normalized by ``cfg.norm``; ``num_classes`` excludes background.  Every option is ``cfg``'s
    (``ModelConfig()`` gives the defaults: no YAML needed).

    Input: list of float images [3, H, W] in 0-255 RGB.  Training returns the loss dict; inference
    returns per image ``boxes`` [N, 4] (xyxy, input pixels), ``labels`` [N], ``scores`` [N], and
    ``masks`` [N, 1, 28, 28] probabilities (paste them with ``paste_detections``) or ``keypoints``
    [N, K, 3] (x, y, visibility) with ``keypoints_scores`` [N, K].
    """
    num_classes, num_keypoints = class_counts(cfg, num_classes, num_keypoints)
    if cfg.task not in ("masks", "boxes", "keypoints"):
        raise ValueError(f"model.task {cfg.task!r} is not masks, boxes or keypoints")
    if cfg.task == "keypoints" and num_keypoints < 1:
        raise ValueError("model.task keypoints: num_keypoints unknown (the training set's categories give it)")
    trunk = ResNet(depth=cfg.depth, groups=cfg.groups, width_per_group=cfg.width_per_group, stem_channels=cfg.stem_channels,
                   base_width=cfg.base_width, norm=cfg.norm, gn_groups=cfg.gn_groups, zero_init_residual=cfg.zero_init_residual,
                   stride_in_1x1=cfg.stride_in_1x1, freeze_at=cfg.freeze_at)
    head_norm = norm_factory(cfg.norm, gn_groups=cfg.gn_groups)
    backbone = BackboneWithFPN(
        trunk,
        return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
        in_channels_list=trunk.out_channels,
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),  # P6 = max-pool of P5, for the RPN only (as Detectron)
        norm_layer=head_norm,
    )
    xavier_fill_(backbone.fpn)
    anchors = FP32AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes),
                                  (tuple(cfg.anchor_aspect_ratios),) * len(cfg.anchor_sizes))
    rpn_head = FP32RPNHead(cfg.fpn_channels, anchors.num_anchors_per_location()[0])
    normal_fill_(rpn_head, std=0.01)
    box_head = FastRCNNConvFCHead((cfg.fpn_channels, 7, 7), [cfg.box_head_conv_dim] * cfg.box_head_num_conv,
                                  [cfg.box_head_fc_dim], norm_layer=head_norm)
    msra_fill_(box_head)  # the 4 convs
    for fc in (m for m in box_head if isinstance(m, nn.Linear)):
        xavier_fill_(fc)  # detectron2's FastRCNNConvFCHead: c2_xavier_fill for its fc layers
    box_predictor = FP32BoxPredictor(cfg.box_head_fc_dim, num_classes + 1)
    normal_fill_(box_predictor.cls_score, std=0.01)
    normal_fill_(box_predictor.bbox_pred, std=0.001)
    pools = ["0", "1", "2", "3"]

    def roi_pool(size: int) -> ParallelRoIPool:
        return ParallelRoIPool(featmap_names=pools, output_size=size, sampling_ratio=cfg.roi_sampling_ratio)

    common = dict(
        num_classes=None, image_mean=list(cfg.pixel_mean), image_std=list(cfg.pixel_std), rpn_anchor_generator=anchors,
        rpn_head=rpn_head, rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_topk_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_topk_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_topk_train, rpn_post_nms_top_n_test=cfg.rpn_post_nms_topk_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image, box_head=box_head, box_predictor=box_predictor,
        box_score_thresh=cfg.score_thresh_test, box_nms_thresh=cfg.nms_thresh_test,
        box_detections_per_img=cfg.detections_per_image,
        box_batch_size_per_image=cfg.roi_batch_size_per_image, box_positive_fraction=cfg.roi_positive_fraction,
        box_roi_pool=roi_pool(7))
    if cfg.task == "masks":
        mask_head = MaskRCNNHeads(cfg.fpn_channels, [cfg.mask_head_conv_dim] * cfg.mask_head_num_conv, 1, norm_layer=head_norm)
        msra_fill_(mask_head)
        mask_predictor = FP32MaskPredictor(cfg.mask_head_conv_dim, cfg.mask_head_conv_dim, num_classes + 1)
        msra_fill_(mask_predictor.conv5_mask)  # a transposed conv: MSRA fill, bias 0, as detectron2
        normal_fill_(mask_predictor.mask_fcn_logits, std=0.001)
        model: FasterRCNN = MaskRCNN(backbone, mask_head=mask_head, mask_predictor=mask_predictor,
                                     mask_roi_pool=roi_pool(14),
                                     **common)
    elif cfg.task == "keypoints":
        # Mask R-CNN's keypoint head: 8 3x3 convs of 512 channels, normalized like every other layer (our
        # choice: the paper names its keypoint model only as "R50-FPN and GN", not where the GN sits).
        keypoint_head = nn.Sequential(*[
            Conv2dNormActivation(cfg.fpn_channels if i == 0 else cfg.keypoint_head_conv_dim, cfg.keypoint_head_conv_dim, 3,
                                 norm_layer=head_norm) for i in range(cfg.keypoint_head_num_conv)])
        msra_fill_(keypoint_head)
        keypoint_predictor = FP32KeypointPredictor(cfg.keypoint_head_conv_dim, num_keypoints)
        msra_fill_(keypoint_predictor.kps_score_lowres)
        model = KeypointRCNN(backbone, keypoint_head=keypoint_head, keypoint_predictor=keypoint_predictor,
                             keypoint_roi_pool=roi_pool(14),
                             **common)
    else:
        model = FasterRCNN(backbone, **common)
    # torchvision's defaults for everything but the CPU threading (the detector builds its RPN itself).
    model.rpn = ParallelRPN(anchors, rpn_head, 0.7, 0.3, cfg.rpn_batch_size_per_image, 0.5,
                            {"training": cfg.rpn_pre_nms_topk_train, "testing": cfg.rpn_pre_nms_topk_test},
                            {"training": cfg.rpn_post_nms_topk_train, "testing": cfg.rpn_post_nms_topk_test}, 0.7)
    model.transform = BatchOnlyTransform(1, 1, list(cfg.pixel_mean), list(cfg.pixel_std), size_divisible=32)
    model.rpn.fg_bg_sampler = SeededSampler(cfg.rpn_batch_size_per_image, 0.5, salt=1)
    model.roi_heads.fg_bg_sampler = SeededSampler(cfg.roi_batch_size_per_image, cfg.roi_positive_fraction, salt=2)
    if cfg.task == "masks":
        use_mask_target_roi_align()  # deterministic mode on CUDA would build targets in 0.4 TiB (layers.py)
    if cfg.roi_head == "cascade":
        from .cascade import make_cascade

        make_cascade(model, ious=tuple(cfg.cascade_ious), weights=tuple(cfg.cascade_weights),
                     fpn_channels=cfg.fpn_channels, conv_dims=[cfg.box_head_conv_dim] * cfg.box_head_num_conv,
                     fc_dim=cfg.box_head_fc_dim, norm_layer=head_norm, num_classes=num_classes)
    return model


def class_counts(cfg: ModelConfig, num_classes: int | None = None, num_keypoints: int | None = None) -> tuple[int, int]:
    """The model's classes and keypoints: the training set's (``num_classes``, ``num_keypoints``), which
    ``model.num_classes`` and ``model.num_keypoints`` must agree with when not 0, else the config's."""
    if cfg.task == "keypoints" and cfg.num_keypoints and num_keypoints and cfg.num_keypoints != num_keypoints:
        raise ValueError(f"model.num_keypoints={cfg.num_keypoints} but the training set's categories have "
                         f"{num_keypoints} keypoints")
    if cfg.num_classes and num_classes and cfg.num_classes != num_classes:
        raise ValueError(f"model.num_classes={cfg.num_classes} but the training set has {num_classes} categories")
    n = num_classes or cfg.num_classes
    if not n:
        raise ValueError("model.num_classes: unknown without a training set; set it (80 for COCO)")
    return n, (num_keypoints or cfg.num_keypoints) if cfg.task == "keypoints" else cfg.num_keypoints


TRUNK_KEYS = ("depth", "groups", "width_per_group", "stem_channels", "base_width", "norm", "gn_groups",
              "zero_init_residual", "stride_in_1x1")


def trunk_kwargs(model_cfg: Any) -> dict[str, Any]:
    """The ``ResNet`` arguments of a ``ModelConfig`` (for ``scratchdet pretrain``'s classifier)."""
    return {k: getattr(model_cfg, k) for k in TRUNK_KEYS}


def paste_detections(
    output: dict[str, Tensor], input_hw: tuple[int, int], orig_hw: tuple[int, int], mask_threshold: float = 0.5
) -> dict[str, Tensor]:
    """Map one image's detections from network-input to original pixels.

    Returns ``boxes`` [N, 4] xyxy (and ``keypoints`` [N, K, 3], scaled alike) and ``masks`` [N, H0, W0] bool at the
    original resolution: bit for bit
    ``paste_masks_in_image(masks, boxes, (H0, W0), padding=1)[:, 0] >= mask_threshold``, at a fraction of
    its cost.  torchvision builds a float image per detection, stacks them and thresholds the stack: N
    full images written, copied and read for N boxes that each cover a small part of the image.  Here
    each mask is resized exactly as torchvision resizes it (the same padded input, integer box and
    ``interpolate`` call, so the same values on any device), then thresholded and written only inside
    its box, into one preallocated tensor.

    ``masks`` is laid out column-major per mask (a transposed view of [N, W0, H0] storage), the Fortran
    (H, W, N) order COCO's RLE encoder reads, so ``to_coco_results`` encodes it without a copy.  A box
    wholly outside the image pastes nothing (torchvision's slicing fails on one).
    """
    (h, w), (h0, w0) = input_hw, orig_hw
    scale = torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h], dtype=output["boxes"].dtype, device=output["boxes"].device)
    boxes = output["boxes"] * scale
    result = {"boxes": boxes, "labels": output["labels"], "scores": output["scores"]}
    if "keypoints" in output:
        # Keypoints [N, K, 3] (x, y, visibility) scale as the boxes do (continuous coordinates).
        result["keypoints"] = torch.cat([output["keypoints"][..., :2] * scale[:2], output["keypoints"][..., 2:]], dim=-1)
        if "keypoints_scores" in output:
            result["keypoints_scores"] = output["keypoints_scores"]
    if "masks" not in output:
        return result
    if torch.jit.is_tracing():
        # A traced graph cannot hold the Python-int slicing below; torchvision's paste has a tracing path.
        result["masks"] = paste_masks_in_image(output["masks"], boxes, (h0, w0), padding=1)[:, 0] >= mask_threshold
        return result
    import numpy as np
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    n, device = len(boxes), output["masks"].device
    # Outside its box a pasted mask is 0.0, which passes a threshold <= 0, as in torchvision's result.
    outside = bool(0.0 >= mask_threshold)
    if device.type == "cpu":
        # numpy's zeros come from calloc, pages the OS hands out already zeroed and that are written only
        # where a box lands; torch.zeros would first write all N * H0 * W0 bytes.
        pasted = torch.from_numpy((np.ones if outside else np.zeros)((n, w0, h0), dtype=bool))
    else:
        pasted = torch.full((n, w0, h0), outside, dtype=torch.bool, device=device)
    if n:
        padded, box_scale = expand_masks(output["masks"], padding=1)
        int_boxes = expand_boxes(boxes, box_scale).to(dtype=torch.int64).tolist()  # one host sync for all boxes
        for i, (bx0, by0, bx1, by1) in enumerate(int_boxes):
            x0, x1, y0, y1 = max(bx0, 0), min(bx1 + 1, w0), max(by0, 0), min(by1 + 1, h0)
            if x1 <= x0 or y1 <= y0:
                continue
            size = (max(by1 - by0 + 1, 1), max(bx1 - bx0 + 1, 1))
            # expand() as torchvision calls it: the same input geometry picks the same interpolation kernel.
            resized = nn.functional.interpolate(padded[i, 0].expand((1, 1, -1, -1)), size=size, mode="bilinear",
                                                align_corners=False)[0, 0]
            pasted[i, x0:x1, y0:y1] = (resized[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0] >= mask_threshold).T
    result["masks"] = pasted.transpose(1, 2)
    return result


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
