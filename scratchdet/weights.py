"""Initialization for the pretrained arm: ImageNet weights, torchvision state dicts, ``scratchdet pretrain``
checkpoints and Detectron's Caffe2 ``.pkl`` models into the trunk; detection checkpoints (a scratchdet run,
its checkpoint files, a detector state dict) into every part of the detector that fits.

Nothing here runs code from a file: torch files load with ``weights_only=True`` and Caffe2
pickles with an unpickler that accepts numpy arrays and plain containers only.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt

log = logging.getLogger("scratchdet.weights")

# torchvision's ImageNet BN models (what detectron2 calls "torchvision" weights), by depth.
TORCHVISION_URLS = {
    18: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    34: "https://download.pytorch.org/models/resnet34-b627a593.pth",
    50: "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    101: "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    152: "https://download.pytorch.org/models/resnet152-394f9c45.pth",
}
# Detectron's ImageNet GN models, the paper's GN baselines: Caffe2 pickles (BGR first conv) trained with the
# stride in the 3x3 conv, as Detectron's GN configs state (STRIDE_1X1: False; only the MSRA BN models put it
# in the 1x1), so they load into our default (torchvision) layout.
DETECTRON_GN_URLS = {
    50: "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/47261647/R-50-GN.pkl",
    101: "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/47592356/R-101-GN.pkl",
}
# Detectron's Caffe2 models take BGR pixels with these means and unit std; in our RGB order:
CAFFE2_PIXEL_MEAN_RGB = [122.7717, 115.9465, 102.9801]
CAFFE2_PIXEL_STD = [1.0, 1.0, 1.0]


class WeightsError(ValueError):
    """Pretrained weights that cannot be used; the message says which file and why."""


# --------------------------------------------------------------------------- Caffe2 pickles


class _RestrictedUnpickler(pickle.Unpickler):
    """Accepts numpy arrays and dtypes and plain containers; refuses every other global."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and plain containers "
                                     "are accepted in a weights pickle")


def load_caffe2_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """The blobs of a Detectron ``.pkl`` (``{'blobs': {...}}`` or a flat dict), restricted unpickling."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError) as e:
        raise WeightsError(f"{path}: not a readable weights pickle ({e})") from None
    blobs = data.get("blobs", data) if isinstance(data, dict) else None
    if not isinstance(blobs, dict):
        raise WeightsError(f"{path}: expected a dict of arrays (Detectron's {{'blobs': ...}})")
    return {k: np.asarray(v) for k, v in blobs.items() if isinstance(v, np.ndarray) and not k.endswith("_momentum")}


def caffe2_to_torchvision(blobs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Detectron names (``res2_0_branch2a_w``, ``*_gn_s``, ``*_bn_s``) -> our (torchvision's) names.

    The first conv's input channels are flipped BGR -> RGB.  Classifier blobs are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in blobs.items():
        if name.startswith(("fc", "pred")):
            continue
        key = name
        key = re.sub(r"^res_conv1_(bn|gn)_", r"conv1_\1_", key)
        m = re.match(r"^res(\d)_(\d+)_branch(1|2a|2b|2c)_(.*)$", key)
        if m:
            stage, block, branch, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            prefix = f"layer{stage - 1}.{block}."
            conv, norm = {"1": ("downsample.0", "downsample.1"), "2a": ("conv1", "bn1"), "2b": ("conv2", "bn2"),
                          "2c": ("conv3", "bn3")}[branch]
        elif key.startswith("conv1_"):
            prefix, conv, norm, rest = "", "conv1", "bn1", key[len("conv1_"):]
        else:
            raise WeightsError(f"unexpected blob {name!r} in a Detectron ResNet pickle")
        suffix = {"w": f"{conv}.weight", "b": f"{conv}.bias", "gn_s": f"{norm}.weight", "gn_b": f"{norm}.bias",
                  "bn_s": f"{norm}.weight", "bn_b": f"{norm}.bias"}.get(rest)
        if suffix is None:
            raise WeightsError(f"unexpected blob {name!r} in a Detectron ResNet pickle")
        tensor = torch.from_numpy(np.ascontiguousarray(value)).float()
        if prefix == "" and conv == "conv1" and rest == "w":
            tensor = tensor.flip(1)  # BGR -> RGB
        out[prefix + suffix] = tensor
    return out


# --------------------------------------------------------------------------- files and downloads


def _fetch(url: str) -> Path:
    """A file from torch's hub cache, downloaded there when online; offline, a clear error."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    target = cache / url.rsplit("/", 1)[1]
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except Exception as e:  # noqa: BLE001 - any network failure gets the same advice
        raise WeightsError(f"cannot download {url} ({e.__class__.__name__}: {e}). Offline? Download "
                           f"{target.name} elsewhere and place it at {target}, or set model.init to its path") from None
    return target


def imagenet_source(depth: int, norm: str) -> str:
    """The ImageNet weights that fit the norm: Detectron's GN models for GN, torchvision's BN models else."""
    if norm == "GN":
        if depth not in DETECTRON_GN_URLS:
            raise WeightsError(f"no published ImageNet GN model for depth {depth} (Detectron has R-50-GN and "
                               "R-101-GN); pretrain one with `scratchdet pretrain` and set model.init to its path")
        return DETECTRON_GN_URLS[depth]
    if depth not in TORCHVISION_URLS:
        raise WeightsError(f"no torchvision ImageNet model for depth {depth}")
    return TORCHVISION_URLS[depth]


# --------------------------------------------------------------------------- what a file holds

# BN, SyncBN and FrozenBN layers hold the same tensors with the same meaning (a BN-trained scale and
# shift), so weights move freely among them; GroupNorm's and a norm-free model's do not
# (a GN scale applied to BN-normalized features, or the reverse, trains from wrongly scaled features).
NORM_FAMILY = {"GN": "GN", "BN": "BN", "SyncBN": "BN", "FrozenBN": "BN", "none": "none"}
_FAMILY_WEIGHTS = {"GN": "GroupNorm weights", "BN": "BatchNorm weights", "none": "weights without normalization layers"}
_FAMILY_ADVICE = {"GN": "model.norm GN", "BN": "model.norm FrozenBN (or SyncBN, BN)", "none": "model.norm none"}
# Torchvision's ResNet names its norm layers bn1..bn3 and downsample.1; a norm-free trunk has neither.
_TRUNK_NORM_PARAM = re.compile(r"(?:^|\.)(?:bn\d|downsample\.1)\.(?:weight|bias)$")
TRUNK_PREFIX = "backbone.body."
# A detector state dict (ours and torchvision's maskrcnn_resnet50_fpn) names its parts so.
DETECTOR_PARTS = (("trunk", TRUNK_PREFIX), ("FPN", "backbone.fpn."), ("RPN", "rpn."), ("box head", "roi_heads.box_head."),
                  ("box predictor", "roi_heads.box_predictor."), ("mask head", "roi_heads.mask_head."),
                  ("mask predictor", "roi_heads.mask_predictor."))
# Layers whose shape is the number of classes: another dataset's are skipped, as detectron2 skips them when
# fine-tuning a COCO model on new classes; any other shape mismatch means another architecture and is an error.
CLASS_DEPENDENT = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.",
                   "roi_heads.mask_predictor.mask_fcn_logits.")


def norm_family(norm: str) -> str:
    """GN, BN (for BN, SyncBN and FrozenBN) or none."""
    return NORM_FAMILY.get(norm, norm)


@dataclass
class Weights:
    """The tensors of a weights file and what is known about them."""

    state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    norm: str  # the file's normalization: GN, BN, SyncBN, FrozenBN or none
    norm_evidence: str  # how ``norm`` was told, for error messages
    detector: bool = False  # names are a whole detector's (``backbone.body.*``, ``rpn.*``, ...), not the trunk's

    def trunk_state(self) -> dict[str, torch.Tensor]:
        """The trunk's tensors in the trunk's own names."""
        if not self.detector:
            return self.state
        return {k[len(TRUNK_PREFIX):]: v for k, v in self.state.items() if k.startswith(TRUNK_PREFIX)}


def _caffe2_norm(blobs: dict[str, np.ndarray], path: Path) -> tuple[str, str]:
    """The norm of a Detectron pickle from its blob suffixes (the converted names no longer tell)."""
    gn = any(k.endswith(("_gn_s", "_gn_b")) for k in blobs)
    bn = any(k.endswith(("_bn_s", "_bn_b")) for k in blobs)
    if gn and bn:
        raise WeightsError(f"{path}: holds both *_gn_* and *_bn_* blobs; not one of Detectron's ResNet models")
    if gn:
        return "GN", "Caffe2 blobs *_gn_s/*_gn_b"
    if bn:
        # MSRA's and Detectron's BN models store BN folded into Caffe2's AffineChannel: a scale and a
        # shift, no running statistics, so the old running-statistics test let them into GN models.
        return "BN", "Caffe2 blobs *_bn_s/*_bn_b (AffineChannel, BN folded into scale and shift)"
    return "none", "no *_gn_*/*_bn_* blobs"


def _state_norm(trunk_state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """The norm of a torch state dict in torchvision's trunk names, from the tensors it holds."""
    if any(k.endswith(("running_mean", "running_var")) for k in trunk_state):
        return "BN", "BatchNorm running statistics"
    if any(_TRUNK_NORM_PARAM.search(k) for k in trunk_state):
        return "GN", "norm scales and shifts without BatchNorm running statistics"
    return "none", "no norm parameters"


def _looks_like_detector(state: dict[str, Any]) -> bool:
    """Whether the names are a whole detector's (ours, torchvision's maskrcnn_resnet50_fpn) rather than a trunk's."""
    return any(k.startswith(tuple(prefix for _, prefix in DETECTOR_PARTS)) for k in state)


def _load_torch(path: Path) -> Any:
    """A torch file with ``weights_only=True``; verified against its ``.sha256`` sidecar when it has one."""
    # scratchdet's own files (checkpoints, pretrain backbones) have a sidecar; torchvision's do not.
    if path.with_name(path.name + ".sha256").is_file() and (problem := ckpt.verify(path)) is not None:
        raise WeightsError(f"{path}: {problem}")
    try:
        return ckpt.load_checkpoint(path, verify_checksum=False)
    except Exception as e:  # noqa: BLE001 - a file that is not a safe torch file
        raise WeightsError(f"{path}: cannot load with weights_only=True ({e.__class__.__name__}: {e})") from None


def _from_run_dir(run_dir: Path) -> tuple[Path, Any]:
    """A run's ``model_final.pth``, else its newest valid periodic checkpoint, else a pretrain run's backbone; verified."""
    final = run_dir / ckpt.FINAL
    if final.is_file():
        try:
            return final, ckpt.load_checkpoint(final)
        except Exception as e:  # noqa: BLE001 - a corrupt final model is reported, not replaced by an older one
            raise WeightsError(f"{final}: not usable ({e}); point model.init at one of the periodic checkpoints "
                               f"({', '.join(p.name for _, p in ckpt.periodic_checkpoints(run_dir)) or 'none'})") from None
    found = ckpt.latest_valid(run_dir)
    if found is not None:
        log.info("model.init %s: no %s, using %s", run_dir, ckpt.FINAL, found[0].name)
        return found
    backbone = run_dir / "backbone_final.pth"
    if backbone.is_file():
        return backbone, _load_torch(backbone)
    raise WeightsError(f"model.init: {run_dir} holds no {ckpt.FINAL}, no valid periodic checkpoint (model_NNNNNNN.pth) "
                       "and no backbone_final.pth")


def _tensors(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """``state`` when it is a non-empty dict of tensors, else a WeightsError."""
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return dict(state)


def read_weights(source: str | Path) -> tuple[Path, Weights]:
    """``(file read, Weights)`` from a ``.pkl``, a trunk or detector state dict, a scratchdet checkpoint or run folder."""
    path = Path(source)
    if path.is_dir():
        path, obj = _from_run_dir(path)
    elif not path.is_file():
        raise WeightsError(f"model.init: {path} does not exist")
    elif path.suffix == ".pkl":
        blobs = load_caffe2_pickle(path)
        norm, evidence = _caffe2_norm(blobs, path)
        meta = {"format": "detectron-caffe2", "norm": norm, "affine_channel": norm == "BN"}
        return path, Weights(caffe2_to_torchvision(blobs), meta, norm, evidence)
    else:
        obj = _load_torch(path)
    if isinstance(obj, dict) and isinstance(obj.get("backbone"), dict) and isinstance(obj.get("meta"), dict):
        state, meta = _tensors(obj["backbone"], path), dict(obj["meta"])  # a `scratchdet pretrain` checkpoint
        norm, evidence = (meta["norm"], "recorded by `scratchdet pretrain`") if "norm" in meta else _state_norm(state)
        return path, Weights(state, meta, norm, evidence)
    wrapped = isinstance(obj, dict) and isinstance(obj.get("model"), dict)
    state = _tensors(obj["model"] if wrapped else obj, path)
    detector = _looks_like_detector(state)
    if not detector:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the ImageNet classifier
    w = Weights(state, {"format": "detector-state-dict" if detector else "torchvision"}, "", "", detector=detector)
    w.norm, w.norm_evidence = _state_norm(w.trunk_state())
    config = obj.get("config") if wrapped else None
    if isinstance(config, dict) and isinstance(config.get("model"), dict) and "norm" in config["model"]:
        # A scratchdet training checkpoint: its config says the norm; the tensors only suggest it.
        w.norm, w.norm_evidence = config["model"]["norm"], "the run's config, model.norm"
        w.meta.update(format="scratchdet-checkpoint", config=config)
        if isinstance(obj.get("seen"), dict):
            w.meta["seen"] = dict(obj["seen"])  # what the detector saw, carried as pretrain_* by the engine
        if isinstance(obj.get("meta"), dict) and "class_names" in obj["meta"]:
            w.meta["class_names"] = list(obj["meta"]["class_names"])
        if "iteration" in obj:
            w.meta["iteration"] = int(obj["iteration"])
    w.meta["norm"] = w.norm
    return path, w


def read_backbone_state(source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(trunk state dict in our names, meta)`` from a path (see ``read_weights``); a detector's trunk for a detector."""
    _, w = read_weights(source)
    return w.trunk_state(), w.meta


def has_batchnorm_statistics(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(("running_mean", "running_var")) for k in state)


# --------------------------------------------------------------------------- checks


def check_norm(source: str | Path, weights: Weights, norm: str) -> None:
    """Refuse weights whose normalization differs from ``model.norm``: nothing about the
    tensors' shapes tells, so a mismatch would load silently and train from wrongly normalized features."""
    have, want = norm_family(weights.norm), norm_family(norm)
    if have == want:
        return
    if want == "GN" and have == "BN":
        why = ("GroupNorm normalizes each image's channel groups; BatchNorm scales and shifts were learned on features "
               "normalized with dataset statistics, and loading them into GN layers would be silently wrong")
    elif want == "BN" and have == "GN":
        why = ("GroupNorm scales and shifts were learned on per-image group statistics; BatchNorm layers would apply "
               "them to features normalized by batch statistics (FrozenBN: not normalized at all), silently wrong")
    elif have == "none":
        why = "the model's norm layers would stay at their init under convs trained without normalization"
    else:
        why = "the model has no norm layers, so the file's would be dropped under convs trained with them"
    raise WeightsError(f"{source}: holds {_FAMILY_WEIGHTS.get(have, have)} (the file's norm is {weights.norm}: "
                       f"{weights.norm_evidence}) but model.norm is {norm}: {why}. Use {_FAMILY_ADVICE.get(have, have)} "
                       f"with this file, or weights trained with norm {norm}"
                       + (" (Detectron's R-50-GN, or `scratchdet pretrain` with norm GN)" if want == "GN" else ""))


def _no_match(source: str | Path, file_keys: list[str], model_keys: list[str], *,
              detector_keys: list[str] | None = None) -> WeightsError:
    """Zero tensors in common is a wrong file or a naming scheme we do not read, never a silent random init."""

    def like(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")

    hint = ""
    if any(k.startswith("module.") for k in file_keys):
        hint = " (a DistributedDataParallel 'module.' prefix?)"
    elif any(k.startswith("backbone.bottom_up.") for k in file_keys):
        hint = " (a detectron2 checkpoint? its names differ from torchvision's)"
    also = f" (or, for a whole detector, {like(detector_keys)})" if detector_keys else ""
    return WeightsError(f"{source}: no tensor in the file matches the model{hint}: the file has {len(file_keys)} "
                        f"tensors named like {like(file_keys)}; the model expects names like {like(model_keys)}{also}")


def _parts(loaded: set[str], own: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The detector's parts sorted into loaded (every tensor), partly loaded, and left at their init."""
    out: dict[str, list[str]] = {"loaded_parts": [], "partial_parts": [], "init_parts": []}
    for part, prefix in DETECTOR_PARTS:
        keys = [k for k in own if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
        n = sum(k in loaded for k in keys)
        if keys:
            out["loaded_parts" if n == len(keys) else "partial_parts" if n else "init_parts"].append(part)
    return out


def _log_keys(source: str | Path, missing: list[str], unexpected: list[str], *, what: str) -> None:
    if missing:
        log.warning("model.init %s: %d %s weights not in the file, left at their init: %s", source, len(missing), what,
                    ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        log.warning("model.init %s: %d weights in the file not used: %s", source, len(unexpected),
                    ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))


# --------------------------------------------------------------------------- loading


def _load_trunk(trunk: nn.Module, weights: Weights, *, source: str | Path, norm: str) -> dict[str, Any]:
    """Load a trunk state dict into a ResNet trunk; ``meta`` with missing and unexpected keys."""
    own = trunk.state_dict()
    # num_batches_tracked only where the trunk keeps one (BN, SyncBN); FrozenBN and GN have none.
    state = {k: v for k, v in weights.trunk_state().items() if not k.endswith("num_batches_tracked") or k in own}
    if not any(k in own for k in state):
        raise _no_match(source, list(state), list(own))
    check_norm(source, weights, norm)
    if weights.meta.get("affine_channel") and has_batchnorm_statistics(own):
        # Caffe2's AffineChannel is y = s * x + b: as BN, running mean 0 and var 1 (up to BN's eps, 1e-5), which
        # is what detectron2's FrozenBatchNorm2d fills in for MSRA models. Set them rather than report them
        # missing and leave whatever the layer held (silently wrong statistics).
        filled = 0
        for k in own:
            layer = k[: -len("running_mean")]
            if k.endswith("running_mean") and layer + "weight" in state and k not in state:
                state[k] = torch.zeros_like(own[k])
                state[layer + "running_var"] = torch.ones_like(own[layer + "running_var"])
                filled += 1
        log.info("model.init %s: Caffe2 AffineChannel weights carry no BN statistics; set running mean 0 and var 1 in "
                 "%d norm layers so each applies the file's scale and shift", source, filled)
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise WeightsError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)} "
                               "(another depth, width or groups?)")
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    trunk.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    _log_keys(source, missing, unexpected, what="backbone")
    log.info("backbone initialized from %s (%s): %d tensors loaded", source, weights.meta.get("format"),
             len(state) - len(unexpected))
    return {**weights.meta, "missing": missing, "unexpected": unexpected, "source": str(source)}


def load_backbone(trunk: nn.Module, init: str, *, depth: int, norm: str) -> dict[str, Any]:
    """Load ``init`` (imagenet or a path) into a ResNet trunk; returns the source's meta.

    Missing and unexpected keys are reported; a shape mismatch, a norm mismatch and a file that matches
    no key are errors. A detector checkpoint gives its trunk.
    """
    source = init
    if init == "imagenet":
        source = str(_fetch(imagenet_source(depth, norm)))
    path, weights = read_weights(source)
    return _load_trunk(trunk, weights, source=path, norm=norm)


def _load_detector(model: nn.Module, weights: Weights, *, source: Path, norm: str) -> dict[str, Any]:
    """Load a detector state dict into a detector: every tensor whose name and shape match."""
    own = model.state_dict()
    state = {k: v for k, v in weights.state.items() if not k.endswith("num_batches_tracked") or k in own}
    if not any(k in own for k in state):
        raise _no_match(source, list(state), list(own))
    check_norm(source, weights, norm)
    skipped = []
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            if k.startswith(CLASS_DEPENDENT):
                skipped.append(k)
                continue
            raise WeightsError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)} "
                               "(another depth, width, head or groups?)")
    load = {k: v for k, v in state.items() if k in own and k not in skipped}
    if not any(k.startswith(TRUNK_PREFIX) for k in load):
        # A few matching head tensors are not a pretrained start: training would go on from a random trunk.
        raise WeightsError(f"{source}: a detector file, but none of its weights fits this model's trunk "
                           f"({TRUNK_PREFIX}*; the file's names look like {', '.join(sorted(state)[:3])}): "
                           "another layout (detectron2's backbone.bottom_up.* needs converting), depth or norm?")
    model.load_state_dict(load, strict=False)
    missing = sorted(k for k in own if k not in load and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    if skipped:
        # Fine-tuning a COCO model on one's own classes: the classifier, box regressor and mask logits
        # are per class, so they start from their init while everything else is the checkpoint's.
        cls = "roi_heads.box_predictor.cls_score.weight"
        log.info("model.init %s: class-dependent predictor layers of another shape (another number of classes - the "
                 "file's classifier has %s outputs, the model's %d, background included - or class-agnostic box "
                 "regression); left at their init: %s", source,
                 state[cls].shape[0] if cls in state else "?", own[cls].shape[0], ", ".join(skipped))
    _log_keys(source, [k for k in missing if k not in skipped], unexpected, what="detector")
    parts = _parts(set(load), own)
    log.info("detector initialized from %s (%s, %d tensors): loaded %s%s; left at their init: %s", source,
             weights.meta.get("format"), len(load), ", ".join(parts["loaded_parts"]) or "nothing entirely",
             f"; partly loaded {', '.join(parts['partial_parts'])}" if parts["partial_parts"] else "",
             ", ".join(parts["init_parts"]) or "nothing")
    return {**weights.meta, "missing": missing, "unexpected": unexpected, "skipped": skipped, "source": str(source),
            **parts}


def load_init(model: nn.Module, init: str, *, depth: int, norm: str) -> dict[str, Any]:
    """Initialize a Mask R-CNN from ``model.init``: ``imagenet`` or a path; see docs/pretrained.md.

    ImageNet weights, trunk state dicts, ``scratchdet pretrain`` checkpoints and Detectron ``.pkl`` files go into
    the trunk; a detection checkpoint (run directory, scratchdet checkpoint, detector state dict) into every part
    whose names and shapes match, the class-dependent predictor layers skipped for another number of classes.
    Returns the source's meta with ``format``, ``source``, ``norm``, ``missing``, ``unexpected``, ``loaded_parts``
    (``partial_parts``, ``init_parts``) and, when the source recorded it, ``seen``.
    """
    source = str(_fetch(imagenet_source(depth, norm))) if init == "imagenet" else init
    path, weights = read_weights(source)
    if weights.detector:
        meta = _load_detector(model, weights, source=path, norm=norm)
    else:
        trunk = model.backbone.body.state_dict()
        if not any(k in trunk for k in weights.state):
            raise _no_match(path, list(weights.state), list(trunk), detector_keys=list(model.state_dict()))
        meta = _load_trunk(model.backbone.body, weights, source=path, norm=norm)
        loaded = {TRUNK_PREFIX + k for k in model.backbone.body.state_dict() if k not in meta["missing"]}
        meta.update(_parts(loaded, model.state_dict()))
        log.info("model.init %s: trunk %s; FPN, RPN and heads left at their init", path,
                 "loaded" if "trunk" in meta["loaded_parts"] else "partly loaded")
    return meta


def save_caffe2_pickle(blobs: dict[str, np.ndarray], path: str | Path) -> None:
    """Write blobs as Detectron does (``{'blobs': ...}``, pickle protocol 2): for tests and conversions."""
    buf = io.BytesIO()
    pickle.dump({"blobs": blobs}, buf, protocol=2)
    Path(path).write_bytes(buf.getvalue())
