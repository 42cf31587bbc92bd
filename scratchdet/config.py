"""Typed configuration: dataclasses with a help text per option, YAML presets, dotted overrides.

A run's configuration is built in three layers, each replacing what the one before set:
the dataclass defaults below, a preset or YAML file, then ``key=value`` overrides from the
command line. There is no inheritance between presets (mmdetection's ``_base_`` chains are
what we avoid): a preset lists every value it changes from these defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("scratchdet")

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "default"

# The paper's unit of schedule (Detectron's 1x): 90k iterations at 16 images per batch,
# with the LR divided by 10 at 60k and 80k, i.e. at total-30k and total-10k.  Longer
# schedules ("Rethinking ImageNet Pre-training", Sec. 4) drop at total-60k and total-20k.
ITERS_PER_X = 90_000
REFERENCE_BATCH = 16


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its help text kept in metadata (printed by ``scratchdet config``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    depth: int = opt(50, "ResNet depth: 18, 34, 50, 101 or 152")
    groups: int = opt(1, "ResNeXt cardinality (32 for 32x8d); 1 for plain ResNet")
    width_per_group: int = opt(64, "ResNeXt width per group (8 for 32x8d); 64 for plain ResNet")
    stem_channels: int = opt(64, "output channels of the stem's 7x7 conv")
    base_width: int = opt(64, "channels of res2's 3x3 convs (doubled at each later stage); 64 in ResNet")
    norm: str = opt(
        "GN",
        "normalization of backbone, FPN, box head and mask head together: GN, SyncBN, BN, FrozenBN or none",
    )
    gn_groups: int = opt(32, "GroupNorm groups (32 in the paper)")
    zero_init_residual: bool = opt(
        False, "init the last norm's scale of each residual block to 0 (detectron2 leaves this off: it hurt GN from scratch)"
    )
    num_classes: int = opt(0, "object classes without background; 0: taken from the training set's categories")
    init: str = opt(
        "random",
        "backbone init: random (from scratch), imagenet (torchvision's BN or Detectron's GN ImageNet weights, by "
        "model.norm), or a path to a torchvision state dict, a `scratchdet pretrain` checkpoint or a Detectron .pkl",
    )
    stride_in_1x1: bool = opt(
        False, "put a bottleneck's stride in its 1x1 conv (Detectron's MSRA/Caffe2 models) instead of the 3x3 (torchvision)"
    )
    freeze_at: int = opt(0, "freeze the stem (1) and res2..resN (N) when fine-tuning; 0 trains everything")
    fpn_channels: int = opt(256, "channels of every FPN level (P2-P6)")
    anchor_sizes: list[int] = opt([32, 64, 128, 256, 512], "anchor size (pixels) of P2..P6, one per level")
    anchor_aspect_ratios: list[float] = opt([0.5, 1.0, 2.0], "anchor aspect ratios (h/w) at every level")
    rpn_batch_size_per_image: int = opt(256, "anchors sampled per image for the RPN loss")
    rpn_pre_nms_topk_train: int = opt(2000, "proposals kept per level before NMS, training")
    rpn_post_nms_topk_train: int = opt(2000, "proposals kept per image after NMS, training")
    rpn_pre_nms_topk_test: int = opt(1000, "proposals kept per level before NMS, inference")
    rpn_post_nms_topk_test: int = opt(1000, "proposals kept per image after NMS, inference")
    box_head_num_conv: int = opt(4, "convs of the box head (the paper's 4conv1fc head)")
    box_head_conv_dim: int = opt(256, "channels of the box head convs")
    box_head_fc_dim: int = opt(1024, "width of the box head fc layer")
    mask_head_num_conv: int = opt(4, "convs of the mask head")
    mask_head_conv_dim: int = opt(256, "channels of the mask head convs")
    roi_batch_size_per_image: int = opt(512, "RoIs sampled per image for the box head loss")
    roi_positive_fraction: float = opt(0.25, "fraction of foreground RoIs in that sample")
    roi_sampling_ratio: int = opt(
        2, "RoIAlign's sampling points per bin side, box/mask/keypoint poolers (Detectron and torchvision: 2; "
           "0: adaptive, as detectron2); 1 costs a quarter of 2 in RoIAlign, the CPU step's second-largest part")
    score_thresh_test: float = opt(0.05, "minimum score of a detection at inference")
    nms_thresh_test: float = opt(0.5, "per-class NMS IoU threshold at inference")
    detections_per_image: int = opt(100, "detections kept per image (COCO evaluates 100)")
    pixel_mean: list[float] = opt(
        [123.675, 116.28, 103.53],
        "RGB mean in 0-255 pixel units (ImageNet's, as detectron2); `scratchdet data stats` computes your data's",
    )
    pixel_std: list[float] = opt([58.395, 57.12, 57.375], "RGB std in 0-255 pixel units (ImageNet's)")
    task: str = opt("masks", "what the detector predicts: masks (Mask R-CNN), boxes (Faster R-CNN) or keypoints "
                             "(Keypoint R-CNN)")
    num_keypoints: int = opt(0, "keypoints per instance for task keypoints; 0: from the training set's categories")
    keypoint_head_num_conv: int = opt(8, "convs of the keypoint head (8 in Mask R-CNN's keypoint head)")
    keypoint_head_conv_dim: int = opt(512, "channels of the keypoint head convs")
    roi_head: str = opt("standard", "standard (one box head) or cascade (Cascade R-CNN: a box head per IoU stage)")
    cascade_ious: list[float] = opt([0.5, 0.6, 0.7], "foreground IoU of each cascade stage (Cai and Vasconcelos)")
    cascade_weights: list[float] = opt([1.0, 0.5, 0.25], "loss weight of each cascade stage")


@dataclass
class DatasetConfig:
    images: str = opt("", "folder of images (file_name in the JSON is relative to it); for format voc, the VOC root, "
                          "or several separated by commas (each with Annotations/, ImageSets/Main/, JPEGImages/)")
    annotations: str = opt("", "COCO JSON (instances, or person keypoints for model.task keypoints); for format voc, "
                               "the image set name (trainval, test), one for all roots or one per root (commas); "
                               "empty for the embedded synthetic dataset")
    format: str = opt("coco", "coco (JSON) or voc (Pascal VOC XML; boxes only: model.task boxes)")


@dataclass
class SynthConfig:
    seed: int = opt(0, "seed of the synthetic dataset (the same seed draws the same dataset)")
    num_train: int = opt(600, "training images of the synthetic dataset")
    num_val: int = opt(100, "validation images of the synthetic dataset")
    image_size: int = opt(256, "side of the square synthetic images, in pixels")
    root: str = opt("", "where it is generated and cached; empty for ~/.cache/scratchdet/synth-<signature>")
    keypoints: bool = opt(False, "use its keypoint annotations (each shape's 4 extreme points: top, right, bottom, "
                                 "left), for model.task keypoints")


@dataclass
class DataConfig:
    train: DatasetConfig = field(default_factory=DatasetConfig, metadata={"help": "training set"})
    val: DatasetConfig = field(default_factory=DatasetConfig, metadata={"help": "validation set (evaluated)"})
    synth: SynthConfig = field(default_factory=SynthConfig, metadata={"help": "the embedded synthetic dataset"})
    min_size_train: list[int] = opt([800], "shorter side at training; several values = multi-scale, one drawn per "
                                           "image or per batch (data.multiscale)")
    multiscale: str = opt("image", "with several data.min_size_train: draw one per image ('image', as detectron2) or "
                                   "one per batch ('batch': every image of a batch at that size, so a smaller size "
                                   "saves its compute instead of being padded up to the batch's largest image)")
    max_size_train: int = opt(1333, "longer side cap at training")
    min_size_test: int = opt(800, "shorter side at inference")
    max_size_test: int = opt(1333, "longer side cap at inference")
    flip_prob: float = opt(0.5, "probability of a horizontal flip at training (the paper's only augmentation)")
    filter_empty: bool = opt(True, "leave out training images without any non-crowd annotation (as Detectron)")
    subset: float = opt(
        0.0, "train on a random subset: a count (10000) or a fraction (0.1) of the images; 0: all. Nested across sizes"
    )
    subset_seed: int = opt(0, "seed of the subset draw; the same seed nests smaller subsets in larger ones")
    lsj: bool = opt(False, "large-scale jitter (detectron2's new baselines): resize by a random factor of "
                           "data.lsj_scale around data.lsj_size, then crop or pad to a square of that size")
    lsj_size: int = opt(1024, "side of LSJ's square crop (test images keep data.min/max_size_test, as detectron2's "
                              "LSJ baselines test at 800/1333)")
    lsj_scale: list[float] = opt([0.1, 2.0], "LSJ's range of scale factors")
    fit: bool = opt(False, "size the input, the anchors and the length from the training set at the start of the "
                           "run (scratchdet data fit's rules, scratchdet/datafit.py); keys given on the command "
                           "line or in a YAML of your own are kept; the log and the dry run say what and why")


@dataclass
class DataloaderConfig:
    num_workers: int = opt(2, "data loading worker processes (0 loads in the main process)")
    aspect_ratio_grouping: bool = opt(True, "batch landscape and portrait images separately, to pad less")


@dataclass
class SolverConfig:
    base_lr: float = opt(0.02, "learning rate at `reference_batch_size` images per batch (0.02 at 16 in the paper)")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(1e-4, "L2 weight decay of conv and fc weights")
    weight_decay_norm: float = opt(0.0, "weight decay of norm scales and shifts (0 as Detectron's WEIGHT_DECAY_GN)")
    weight_decay_bias: float = opt(1e-4, "weight decay of biases (1e-4 = weight_decay, detectron2's default; Detectron "
                                         "applied none to biases and doubled their LR)")
    ims_per_batch: int = opt(16, "images per iteration, summed over all processes")
    max_iter: int = opt(90_000, "training iterations (replaced by `schedule` when that is set)")
    steps: list[int] = opt([60_000, 80_000], "iterations at which the LR is multiplied by `gamma`")
    gamma: float = opt(0.1, "LR decay factor at each step")
    warmup_iters: int = opt(1000, "iterations of linear warmup (1000: detectron2's default; Detectron's was 500)")
    warmup_factor: float = opt(0.001, "LR factor at iteration 0 of the warmup (0.001: detectron2's; Detectron's 1/3)")
    epochs: float = opt(0.0, "train for this many passes over the training set (sets max_iter; steps keep their fraction)")
    schedule: str = opt("", "the paper's schedule in units of solver.schedule_unit, e.g. '6x' = 540k iterations at 16 "
                            "images, LR drops at total-60k/-20k (total-2/3 and -2/9 of a unit)")
    schedule_unit: int = opt(
        ITERS_PER_X, "iterations of one schedule unit ('1x') at reference_batch_size images: the paper's 90k. A study on a "
                     "small set sets a small unit and keeps the paper's shape (LR /10 at total-2/3 and total-2/9 unit)")
    reference_batch_size: int = opt(
        0,
        "batch size at which base_lr, max_iter, steps and warmup are stated; others scale linearly. 0: no scaling",
    )
    skip_nonfinite: int = opt(
        0, "non-finite losses or gradients to skip (step not taken, logged) before stopping; 0: stop at the first"
    )
    clip_gradients: str = opt(
        "off", "gradient clipping before each step: off, norm (scale all gradients together so their total "
               "clip_norm_type-norm is at most clip_value, as torch's clip_grad_norm_ and mmdetection's grad_clip; "
               "detectron2's norm clipping bounds each tensor alone) or value (clamp each gradient element to "
               "[-clip_value, clip_value], as detectron2's); for runs that diverge (from scratch, SyncBN)")
    clip_value: float = opt(1.0, "the bound of solver.clip_gradients: the largest total norm, or element magnitude")
    clip_norm_type: float = opt(2.0, "the p of the p-norm solver.clip_gradients=norm bounds (inf: the largest element)")
    checkpoint_period: int = opt(5000, "iterations between checkpoints")
    keep_checkpoints: int = opt(3, "periodic checkpoints kept (older ones deleted); model_final is always kept")


@dataclass
class TestConfig:
    eval_period: int = opt(0, "iterations between evaluations during training (0: only at the end)")
    max_images: int = opt(0, "evaluate only the first N validation images (0: all)")
    ims_per_batch: int = opt(1, "images per inference batch")
    aug: bool = opt(False, "test-time augmentation: every size of test.aug_min_sizes, each also flipped; boxes merged, "
                           "masks and keypoints averaged")
    aug_min_sizes: list[int] = opt([400, 500, 600, 700, 800, 900, 1000, 1100, 1200],
                                   "shorter sides of test-time augmentation (Detectron's, as the paper's TTA)")
    aug_max_size: int = opt(4000, "longer side cap of test-time augmentation")
    aug_flip: bool = opt(True, "test-time augmentation adds the horizontal flip of each size")


@dataclass
class TrainConfig:
    seed: int = opt(0, "seed of every RNG (Python, NumPy, torch, sampler, augmentation)")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (cuda when available); cuda where torch sees no GPU is an "
                              "error")
    amp: str = opt("auto", "mixed precision: off (full fp32), bf16, fp16 or auto (bf16 where the hardware computes it "
                           "natively: AVX512-BF16, AMX or ARM BF16 CPUs, CUDA compute capability 8.0+, with TF32 for "
                           "the fp32 matmuls left on CUDA; else fp32. GroupNorm, boxes stay fp32). A forced bf16 "
                           "where it is only emulated runs slower, with a warning")
    channels_last: str = opt("auto", "channels-last memory format for the model: on, off or auto (on where measured to "
                                     "pay: the CPU; off on CUDA, where GroupNorm converts each input back to NCHW)")
    deterministic: str = opt(
        "auto",
        "deterministic algorithms: on (bitwise-reproducible runs), off, or auto: on for the CPU, off on CUDA, where "
        "deterministic mode sends RoIAlign's backward to torchvision's slow pure-PyTorch path. Keypoint models "
        "stop under on with CUDA: their bilinear upsampling has no deterministic CUDA backward (docs/gpu.md)",
    )
    log_period: int = opt(20, "iterations between training log lines in metrics.jsonl")
    dist_timeout: float = opt(
        1800.0, "seconds a collective waits under torchrun before the job stops with a report of the ranks that stalled"
    )
    num_threads: int = opt(0, "torch CPU threads (0: torch's default)")


@dataclass
class PretrainConfig:
    images: str = opt("", "ImageFolder root for `scratchdet pretrain` (one sub-folder of images per class)")
    crop_size: int = opt(224, "random-resized-crop size")
    crop_scale: float = opt(0.08, "smallest area fraction a random-resized crop keeps (ImageNet's 0.08; "
                            "raise it where the object fills the image, so a crop still shows it)")
    lr_schedule: str = opt("cosine", "cosine or step (the solver's steps and gamma)")


@dataclass
class Config:
    # What load_config did beyond the layers (a moved schedule), for the run's log; not a field, not dumped.
    load_notes: typing.ClassVar[tuple[str, ...]] = ()
    # The keys the user set (command-line overrides, and every key of a YAML file that is not a built-in preset),
    # as against the defaults and a built-in preset's values: a dry run checks the data the user named.
    given_keys: typing.ClassVar[frozenset[str]] = frozenset()
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the detector"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "datasets and input sizes"})
    dataloader: DataloaderConfig = field(default_factory=DataloaderConfig, metadata={"help": "data loading"})
    solver: SolverConfig = field(default_factory=SolverConfig, metadata={"help": "optimizer and schedule"})
    test: TestConfig = field(default_factory=TestConfig, metadata={"help": "evaluation"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "the run itself"})
    pretrain: PretrainConfig = field(default_factory=PretrainConfig, metadata={"help": "`scratchdet pretrain`"})


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


# --------------------------------------------------------------------------- conversion


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Return ``value`` converted to annotation ``tp``, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on as a boolean: train.amp=off
            return "on" if value else "off"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # "6x" needs quotes in YAML; a bare 6 is accepted as "6"
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# Options that existed once: a saved run's config.yaml may still hold them.
REMOVED_KEYS = {
    "solver.fp32_cpu_scale": "removed (it gave CPUs without native bf16 a shorter schedule whose AP was never "
                             "measured); every precision now runs the same schedule",
}


# Keys added since runs were first saved, with the value that gives the old behaviour: a config saved
# before a key existed reads as having it at that value.
ADDED_KEYS = {"data.fit": False, "data.multiscale": "image"}


def without_removed(flat: dict[str, Any]) -> dict[str, Any]:
    """A saved, flattened config (dotted keys) as today's code reads it: without the keys of ``REMOVED_KEYS``
    (they mean nothing now) and with the keys of ``ADDED_KEYS`` it predates, so a run saved before a change
    neither drifts from nor splits from the same run saved after."""
    return {**ADDED_KEYS, **{k: v for k, v in flat.items() if k not in REMOVED_KEYS}}


def merge_dict(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set fields of dataclass ``obj`` from a nested dict, checking names and types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    types_ = _field_types(type(obj))
    for name, value in values.items():
        key = prefix + str(name)
        if key in REMOVED_KEYS:
            # A run's config.yaml from before the key was removed still resumes; the key does nothing now.
            log.warning("%s: %s; ignored", key, REMOVED_KEYS[key])
            continue
        if name not in types_:
            raise ConfigError(f"unknown config key '{key}' (known under '{prefix or '.'}': {', '.join(types_)})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            merge_dict(current, value, key + ".")
        else:
            setattr(obj, name, _check_value(key, types_[name], value))


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key (``solver.base_lr``) to a value, checking name and type."""
    parts = key.split(".")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    merge_dict(cfg, nested)


def parse_override(text: str) -> tuple[str, Any]:
    """``'solver.base_lr=0.01'`` -> ``('solver.base_lr', 0.01)``; values are read as YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot read value {raw!r}: {e}") from None
    return key, value


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


# Presets taken out, each with why and what to use instead: a name that loaded once says so, not "unknown".
RETIRED_PRESETS = {
    "small_real": "retired: measured on real sets it lost to the plain default, trained on a CPU in fp32 with only the "
                  "data changed (170 pedestrian photos: 31.61 box / 26.18 mask AP in 42 min 46 s against the "
                  "default's 51.6 / 42.9 in about 24 min; on the nuclei set its own dry run warns that 53% of the boxes "
                  "fall under its smallest anchor). Use the default with data.fit=true, which sizes the input, anchors "
                  "and length from your boxes (docs/data.md)",
}


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (``mask_rcnn_R50_FPN_GN_scratch_6x``) or a path to a YAML file."""
    if name_or_path in RETIRED_PRESETS:
        raise ConfigError(f"preset '{name_or_path}' {RETIRED_PRESETS[name_or_path]}")
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown preset '{name_or_path}'; presets: {', '.join(list_presets())}")
    return preset


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then a preset or YAML file, then ``key=value`` overrides."""
    cfg = Config()
    path = resolve_preset(preset or DEFAULT_PRESET)
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    try:
        merge_dict(cfg, values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    builtin = path.resolve().parent == PRESET_DIR.resolve()
    user_keys = set() if builtin else set(flatten(values))
    # The schedule as it stood before the last solver.max_iter override, and the keys given after it:
    # steps and warmup set before a new length (by the preset or an earlier override) move with it.
    before = (cfg.solver.max_iter, list(cfg.solver.steps), cfg.solver.warmup_iters)
    given: set[str] = set()
    notes: list[str] = []
    for text in overrides:
        key, value = parse_override(text)
        if key == "solver.max_iter":  # the length before this override, with the previous one's schedule moved
            notes += follow_length(cfg, before, given)
            before, given = (cfg.solver.max_iter, list(cfg.solver.steps), cfg.solver.warmup_iters), set()
        set_key(cfg, key, value)
        given.add(key)
        user_keys.add(key)
    cfg.load_notes = tuple(notes) + follow_length(cfg, before, given)
    cfg.given_keys = frozenset(user_keys)
    validate(cfg)
    return cfg


def follow_length(cfg: Config, before: tuple[int, list[int], int], given: set[str]) -> tuple[str, ...]:
    """Move the preset's LR steps and warmup with a ``solver.max_iter`` override that leaves them unset.

    Without this, ``solver.max_iter=20000`` on a 1500-iteration preset kept its drops at 1250/1425 and
    trained 93% of the run at the final LR.
    """
    s = cfg.solver
    old_max, old_steps, old_warmup = before
    if "solver.max_iter" not in given or s.max_iter == old_max:
        return ()
    if s.schedule or s.epochs:
        # Said in the run's log (not an error: studies and `scratchdet pretrain` give both and say which wins).
        return (f"solver.max_iter={s.max_iter} does not set the length: solver."
                f"{'schedule=' + s.schedule if s.schedule else f'epochs={s.epochs:g}'} does",)
    k = s.max_iter / old_max
    moved = []
    if "solver.steps" not in given and old_steps:
        s.steps = [int(v * k) for v in old_steps]  # floor: a step stays inside the run
        moved.append(f"LR drops {old_steps} -> {s.steps}")
    if "solver.warmup_iters" not in given and old_warmup:
        s.warmup_iters = int(old_warmup * k)
        moved.append(f"warmup {old_warmup} -> {s.warmup_iters}")
    if not moved:
        return ()
    return (f"solver.max_iter {old_max} -> {s.max_iter}: the preset's schedule moved with it (same fractions): "
            + ", ".join(moved),)


def validate(cfg: Config) -> None:
    """Checks that cross fields; each message names the key to change."""
    choices = {
        "model.norm": (cfg.model.norm, ("GN", "SyncBN", "BN", "FrozenBN", "none")),
        "model.depth": (cfg.model.depth, (18, 34, 50, 101, 152)),
        "train.amp": (cfg.train.amp, ("off", "bf16", "fp16", "auto")),
        "train.deterministic": (cfg.train.deterministic, ("auto", "on", "off")),
        "solver.clip_gradients": (cfg.solver.clip_gradients, ("off", "norm", "value")),
        "train.channels_last": (cfg.train.channels_last, ("auto", "on", "off")),
        "model.task": (cfg.model.task, ("masks", "boxes", "keypoints")),
        "model.roi_head": (cfg.model.roi_head, ("standard", "cascade")),
        "data.train.format": (cfg.data.train.format, ("coco", "voc")),
        "data.val.format": (cfg.data.val.format, ("coco", "voc")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    if cfg.model.norm == "FrozenBN" and cfg.model.init == "random":
        raise ConfigError(
            "model.norm: FrozenBN freezes statistics that a randomly initialized network does not have "
            "(mean 0, var 1 forever), so nothing would normalize; use GN or SyncBN to train from scratch "
            "(as the paper does), or FrozenBN only with pretrained weights (model.init)"
        )
    if cfg.model.depth in (18, 34) and (cfg.model.groups != 1 or cfg.model.width_per_group != 64):
        raise ConfigError(
            f"model.groups={cfg.model.groups} / model.width_per_group={cfg.model.width_per_group}: ResNeXt widths "
            f"apply to bottleneck blocks (depth 50, 101, 152); depth {cfg.model.depth} uses basic blocks, which "
            "have no grouped conv. Use depth 50+ or leave groups=1, width_per_group=64"
        )
    if not 0 <= cfg.model.freeze_at <= 5:
        raise ConfigError(f"model.freeze_at: {cfg.model.freeze_at} is not 0 (nothing) to 5 (stem and res2-res5)")
    if cfg.model.freeze_at and cfg.model.init == "random":
        raise ConfigError(
            f"model.freeze_at={cfg.model.freeze_at} with model.init=random would freeze randomly initialized layers "
            "(they would never learn); freeze only pretrained stages (set model.init), or use freeze_at=0"
        )
    for split in ("train", "val"):
        if getattr(cfg.data, split).format == "voc" and cfg.model.task != "boxes":
            raise ConfigError(f"data.{split}.format: voc has boxes only; set model.task=boxes (Faster R-CNN)")
        if getattr(cfg.data, split).format == "voc" and not getattr(cfg.data, split).annotations:
            # Without them the synthetic COCO data would be used, not a VOC set.
            raise ConfigError(f"data.{split}.format: voc needs data.{split}.images (VOC root(s), comma-separated) "
                              f"and data.{split}.annotations (the image set name, e.g. trainval)")
    if len(cfg.model.cascade_ious) != len(cfg.model.cascade_weights) or not cfg.model.cascade_ious:
        raise ConfigError("model.cascade_ious / model.cascade_weights: give one weight per stage (3 in Cascade R-CNN)")
    if cfg.model.roi_head == "cascade" and cfg.model.task == "keypoints":
        raise ConfigError("model.roi_head: cascade is built for boxes and masks; keypoints use the standard head")
    if cfg.model.task == "keypoints" and not cfg.data.train.annotations and not cfg.data.synth.keypoints:
        raise ConfigError("model.task keypoints on the synthetic dataset: set data.synth.keypoints=true (its keypoint "
                          "annotations), or give data.train.annotations a COCO person-keypoints file")
    if cfg.data.multiscale not in ("image", "batch"):
        raise ConfigError(f"data.multiscale: {cfg.data.multiscale!r} (give image or batch)")
    if cfg.data.lsj and cfg.data.multiscale == "batch":
        raise ConfigError("data.multiscale=batch draws data.min_size_train per batch; data.lsj draws its own scale "
                          "per image: choose one")
    if cfg.data.lsj and not 0 < cfg.data.lsj_scale[0] <= cfg.data.lsj_scale[-1]:
        raise ConfigError(f"data.lsj_scale: {cfg.data.lsj_scale} is not a range of positive factors [low, high]")
    if cfg.model.roi_sampling_ratio < 0:
        raise ConfigError(f"model.roi_sampling_ratio: {cfg.model.roi_sampling_ratio} (give 1, 2, ... points per bin "
                          "side, or 0 for adaptive)")
    if cfg.solver.clip_gradients != "off" and not cfg.solver.clip_value > 0:
        raise ConfigError(f"solver.clip_value: {cfg.solver.clip_value} is not a positive bound for "
                          f"solver.clip_gradients={cfg.solver.clip_gradients}")
    if cfg.solver.clip_gradients == "norm" and not cfg.solver.clip_norm_type > 0:
        raise ConfigError(f"solver.clip_norm_type: {cfg.solver.clip_norm_type} is not a positive p")
    if len(cfg.model.anchor_sizes) != 5:
        raise ConfigError("model.anchor_sizes: give one size per FPN level P2..P6 (5 values)")
    if len(cfg.model.pixel_mean) != 3 or len(cfg.model.pixel_std) != 3:
        raise ConfigError("model.pixel_mean / model.pixel_std: give 3 values (R, G, B)")
    for key, value, low in (("solver.max_iter", cfg.solver.max_iter, 1), ("solver.checkpoint_period",
                            cfg.solver.checkpoint_period, 1), ("train.log_period", cfg.train.log_period, 1),
                            ("test.eval_period", cfg.test.eval_period, 0), ("test.max_images", cfg.test.max_images, 0),
                            ("solver.warmup_iters", cfg.solver.warmup_iters, 0)):
        if value < low:
            raise ConfigError(f"{key}: must be at least {low} (got {value})")
    if cfg.solver.schedule_unit < 1:
        raise ConfigError(f"solver.schedule_unit: {cfg.solver.schedule_unit} is not a positive number of iterations")
    if cfg.solver.ims_per_batch < 1:
        raise ConfigError("solver.ims_per_batch: must be at least 1")
    if list(cfg.solver.steps) != sorted(cfg.solver.steps):
        raise ConfigError(f"solver.steps: must be increasing, got {cfg.solver.steps}")
    if not cfg.data.min_size_train:
        raise ConfigError("data.min_size_train: give at least one size")
    if bool(cfg.data.train.images) != bool(cfg.data.train.annotations):
        raise ConfigError("data.train.images and data.train.annotations: give both (or neither, for synthetic data)")
    if bool(cfg.data.val.images) != bool(cfg.data.val.annotations):
        raise ConfigError("data.val.images and data.val.annotations: give both (or neither)")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (a run's ``config.yaml``)."""
    cfg = Config()
    merge_dict(cfg, values)
    return cfg


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"section.key": value}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys, sorted, whose values differ between two flattened configs (a key missing from one differs)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, help)`` for every option, for ``scratchdet config``."""
    rows = []
    obj = cls()
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(type(value), prefix + f.name + "."))
        else:
            rows.append((prefix + f.name, repr(value), f.metadata.get("help", "")))
    return rows
