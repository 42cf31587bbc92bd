"""Backbone initialization for the pretrained arm: ImageNet weights, torchvision state dicts,
``scratchdet pretrain`` checkpoints and Detectron's Caffe2 ``.pkl`` models.

Nothing here runs code from a file: torch files load with ``weights_only=True`` and Caffe2
pickles with an unpickler that accepts numpy arrays and plain containers only.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger("scratchdet.weights")

# torchvision's ImageNet BN models (what detectron2 calls "torchvision" weights), by depth.
TORCHVISION_URLS = {
    18: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    34: "https://download.pytorch.org/models/resnet34-b627a593.pth",
    50: "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    101: "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    152: "https://download.pytorch.org/models/resnet152-394f9c45.pth",
}
# Detectron's ImageNet GN models, the paper's GN baselines (Caffe2 pickles, stride in the 1x1, BGR).
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


def read_backbone_state(source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict in our names, meta)`` from a path: torchvision ``.pth``, scratchdet pretrain, Detectron ``.pkl``."""
    path = Path(source)
    if not path.is_file():
        raise WeightsError(f"model.init: {path} does not exist")
    if path.suffix == ".pkl":
        return caffe2_to_torchvision(load_caffe2_pickle(path)), {"format": "detectron-caffe2"}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a file that is not a safe torch file
        raise WeightsError(f"{path}: cannot load with weights_only=True ({e.__class__.__name__}: {e})") from None
    if isinstance(state, dict) and "backbone" in state and isinstance(state.get("meta"), dict):
        return dict(state["backbone"]), dict(state["meta"])  # a scratchdet pretrain checkpoint
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return {k: v for k, v in state.items() if not k.startswith("fc.")}, {"format": "torchvision"}


def has_batchnorm_statistics(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(("running_mean", "running_var")) for k in state)


def load_backbone(trunk: nn.Module, init: str, *, depth: int, norm: str) -> dict[str, Any]:
    """Load ``init`` (imagenet or a path) into a ResNet trunk; returns the source's meta.

    Missing and unexpected keys are reported; a shape mismatch is an error.
    """
    source = init
    if init == "imagenet":
        source = str(_fetch(imagenet_source(depth, norm)))
    state, meta = read_backbone_state(source)
    if norm == "GN" and has_batchnorm_statistics(state):
        raise WeightsError(f"{source}: holds BatchNorm weights (running statistics) but model.norm is GN: a GN layer "
                           "cannot use BN statistics, and loading only the scales would be silently wrong. Use "
                           "norm FrozenBN or SyncBN with these weights, or GN weights (Detectron's R-50-GN, or "
                           "`scratchdet pretrain` with norm GN)")
    own = trunk.state_dict()
    if not has_batchnorm_statistics(own):
        # FrozenBN keeps running stats as buffers; GN has none. Drop what the trunk cannot hold.
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    else:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") or k in own}
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise WeightsError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)} "
                               "(another depth, width or groups?)")
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    trunk.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if missing:
        log.warning("model.init %s: %d backbone weights not in the file, left at random init: %s", source,
                    len(missing), ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        log.warning("model.init %s: %d weights in the file not used: %s", source, len(unexpected),
                    ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
    log.info("backbone initialized from %s (%s): %d tensors loaded", source, meta.get("format"),
             len(state) - len(unexpected))
    return {**meta, "missing": missing, "unexpected": unexpected, "source": source}


def save_caffe2_pickle(blobs: dict[str, np.ndarray], path: str | Path) -> None:
    """Write blobs as Detectron does (``{'blobs': ...}``, pickle protocol 2): for tests and conversions."""
    buf = io.BytesIO()
    pickle.dump({"blobs": blobs}, buf, protocol=2)
    Path(path).write_bytes(buf.getvalue())
