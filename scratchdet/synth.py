"""The embedded synthetic dataset: procedurally drawn shapes in COCO format, exact masks.

Made to be learnable on a laptop CPU in minutes and still far from saturated: 6 shape
classes, objects from about 8 to 128 px (log-uniform over the whole range for a quarter of
them, from 24 px up for the rest, so small ones are common as in COCO), overlapping and
occluded instances whose masks are the *visible* part, textured
backgrounds, and unannotated distractor scribbles and blobs.  Deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import faster_coco_eval.core.mask as mask_utils
import numpy as np
from PIL import Image, ImageDraw

VERSION = 3  # bump when the drawing changes, so caches are regenerated
CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
# Shapes the detection set never holds: a pre-training corpus of these is to the detector what
# ImageNet is to COCO (the same kind of pixels, other classes), not extra labelled target data.
OTHER_CLASSES = ("hexagon", "crescent", "semicircle", "arrow", "lshape", "tshape", "trapezoid", "heart")
CLASS_SETS = {"target": CLASSES, "other": OTHER_CLASSES}
MIN_SIZE, MAX_SIZE = 8, 128  # object extent in pixels (see draw_image for the distribution)
MIN_VISIBLE = 0.4  # an instance hidden more than this is not drawn at all (nobody could label it)


@dataclass(frozen=True)
class SynthStats:
    images: int
    instances: int
    occluded: int  # instances with part of their shape hidden by a later one
    min_extent: float
    max_extent: float


def _shape_polygons(kind: str, cx: float, cy: float, r: float, angle: float, aspect: float, rng) -> tuple:
    """Outer polygon(s) and hole polygon(s) of one shape, as lists of (x, y)."""

    def pts(n: int, radius: float, phase: float = 0.0, sx: float = 1.0, sy: float = 1.0) -> list:
        out = []
        for k in range(n):
            t = phase + 2 * math.pi * k / n
            x, y = radius * math.cos(t) * sx, radius * math.sin(t) * sy
            xr = x * math.cos(angle) - y * math.sin(angle)
            yr = x * math.sin(angle) + y * math.cos(angle)
            out.append((cx + xr, cy + yr))
        return out

    sx, sy = math.sqrt(aspect), 1 / math.sqrt(aspect)
    n_round = max(16, int(r * 1.5))
    if kind == "circle":
        return [pts(n_round, r, 0, sx, sy)], []
    if kind == "square":
        return [pts(4, r, math.pi / 4, sx, sy)], []
    if kind == "triangle":
        return [pts(3, r, -math.pi / 2, sx, sy)], []
    if kind == "hexagon":
        return [pts(6, r, 0, sx, sy)], []
    if kind == "star":
        outer, inner = pts(5, r, -math.pi / 2, sx, sy), pts(5, r * 0.42, -math.pi / 2 + math.pi / 5, sx, sy)
        return [[p for pair in zip(outer, inner) for p in pair]], []
    if kind == "cross":
        w = 0.33
        base = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        poly = []
        for x, y in base:
            x, y = x * r * sx, y * r * sy
            poly.append((cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle)))
        return [poly], []
    if kind in UNIT_POLYGONS:
        poly = []
        for x, y in UNIT_POLYGONS[kind]:
            x, y = x * r * sx, y * r * sy
            poly.append((cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle)))
        return [poly], []
    if kind == "ring":
        return [pts(n_round, r, 0, sx, sy)], [pts(n_round, r * 0.55, 0, sx, sy)]
    if kind == "crescent":
        d = r * 0.55
        hole = [(x + d * math.cos(angle), y + d * math.sin(angle)) for x, y in pts(n_round, r * 0.85, 0, sx, sy)]
        return [pts(n_round, r, 0, sx, sy)], [hole]
    raise ValueError(kind)


def _heart(n: int = 24) -> list:
    """The classic parametric heart, scaled to about unit radius (y grows downwards, as in an image)."""
    out = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        out.append((x / 17, -y / 17))
    return out


# Unit-radius outlines (x, y about in [-1, 1]) of the other classes' shapes.
UNIT_POLYGONS = {
    "arrow": [(-1, -0.3), (0.2, -0.3), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, 0.3), (-1, 0.3)],
    "lshape": [(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)],
    "tshape": [(-1, -1), (1, -1), (1, -0.4), (0.3, -0.4), (0.3, 1), (-0.3, 1), (-0.3, -0.4), (-1, -0.4)],
    "trapezoid": [(-1, 0.7), (1, 0.7), (0.45, -0.7), (-0.45, -0.7)],
    "semicircle": [(math.cos(math.pi * k / 16), 0.45 - math.sin(math.pi * k / 16)) for k in range(17)],
    "heart": _heart(),
}


def _rasterize(size: int, outer: list, holes: list) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for poly in outer:
        draw.polygon(poly, fill=1)
    for poly in holes:
        draw.polygon(poly, fill=0)
    return np.asarray(img, dtype=bool)


def _smooth_noise(rng, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise: a coarse random grid upsampled bilinearly, values in [0, 1]."""
    grid = rng.random((cells + 1, cells + 1, channels)).astype(np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8).squeeze() if channels == 1 else (grid * 255).astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32).reshape(size, size, channels) / 255


def _background(rng, size: int) -> np.ndarray:
    base = rng.random(3) * 0.8 + 0.1
    tint = _smooth_noise(rng, size, int(rng.integers(2, 8)), 3) - 0.5
    img = base + 0.5 * tint
    if rng.random() < 0.6:  # stripes or checks at a random angle and period
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        t = rng.random() * math.pi
        period = rng.uniform(6, 40)
        wave = np.sin((xx * math.cos(t) + yy * math.sin(t)) * 2 * math.pi / period)
        img += (rng.random(3) - 0.5)[None, None] * 0.35 * wave[..., None]
    img += rng.normal(0, 0.04, (size, size, 3))
    return img


def _draw_distractors(rng, img: np.ndarray) -> None:
    """Unannotated clutter: scribbled lines and irregular blobs that are none of the classes."""
    size = img.shape[0]
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(2, 7))):
        if rng.random() < 0.5:
            p = rng.random(2) * size
            pts = [tuple(p)]
            for _ in range(int(rng.integers(2, 6))):
                p = p + rng.normal(0, size / 8, 2)
                pts.append(tuple(p))
            draw.line(pts, fill=255, width=int(rng.integers(1, 4)))
        else:
            c, r = rng.random(2) * size, rng.uniform(4, 24)
            n = int(rng.integers(7, 14))
            pts = [(c[0] + r * rng.uniform(0.4, 1.2) * math.cos(2 * math.pi * k / n),
                    c[1] + r * rng.uniform(0.4, 1.2) * math.sin(2 * math.pi * k / n)) for k in range(n)]
            draw.polygon(pts, fill=255)
        m = np.asarray(layer, dtype=bool)
        img[m] = rng.random(3)
        draw.rectangle((0, 0, size, size), fill=0)


def _object_texture(rng, size: int, avoid: np.ndarray) -> np.ndarray:
    # A color at least a little away from the background's mean: hard cases come from clutter,
    # occlusion and size, not from objects that are invisible.
    color = rng.random(3)
    for _ in range(10):
        if np.abs(color - avoid).sum() > 0.6:
            break
        color = rng.random(3)
    tex = np.broadcast_to(color, (size, size, 3)).copy()
    if rng.random() < 0.5:  # a second color blended by smooth noise: not every object is flat
        tex += (rng.random(3) - color) * _smooth_noise(rng, size, 3, 1) * 0.6
    return tex


def draw_image(rng: np.random.Generator, size: int, classes: tuple[str, ...] = CLASSES) -> tuple[np.ndarray, list[dict]]:
    """One image [H, W, 3] uint8 and its instances (index into ``classes``, visible mask, occluded flag)."""
    img = _background(rng, size)
    _draw_distractors(rng, img)
    objects = []
    for _ in range(int(rng.integers(3, 11))):
        # Log-uniform sizes over the whole range for a quarter of the objects, the rest from 24 px up:
        # small objects stay common without dominating the AP.
        low = MIN_SIZE if rng.random() < 0.25 else 24
        extent = math.exp(rng.uniform(math.log(low), math.log(MAX_SIZE)))
        if objects and rng.random() < 0.45:  # place next to an earlier object, so they overlap
            other = objects[int(rng.integers(len(objects)))]
            ang = rng.uniform(0, 2 * math.pi)
            dist = (other["extent"] + extent) / 2 * rng.uniform(0.3, 0.9)
            cx, cy = other["cx"] + dist * math.cos(ang), other["cy"] + dist * math.sin(ang)
        else:
            cx, cy = rng.uniform(0, size), rng.uniform(0, size)
        cls = int(rng.integers(len(classes)))
        outer, holes = _shape_polygons(classes[cls], cx, cy, extent / 2, rng.uniform(0, 2 * math.pi),
                                       rng.uniform(0.75, 1.33), rng)
        full = _rasterize(size, outer, holes)
        if full.sum() < 12:
            continue
        objects.append({"cls": cls, "cx": cx, "cy": cy, "extent": extent, "full": full})
    # Visible part = full shape minus every shape drawn later; drop the nearly hidden, which can
    # only reveal more of the ones below, so one pass from the top settles it.
    kept: list[dict] = []
    cover = np.zeros((size, size), dtype=bool)
    for obj in reversed(objects):
        visible = obj["full"] & ~cover
        area_full = obj["full"].sum()
        if visible.sum() < MIN_VISIBLE * area_full or visible.sum() < 12:
            continue
        obj["visible"] = visible
        obj["occluded"] = bool(visible.sum() < area_full)
        kept.append(obj)
        cover |= obj["full"]
    kept.reverse()
    for obj in kept:
        tex = _object_texture(rng, size, img[obj["full"]].mean(0))
        img[obj["full"]] = tex[obj["full"]]
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    return (img * 255).round().astype(np.uint8), kept


def signature(*, seed: int, num_train: int, num_val: int, image_size: int) -> str:
    key = json.dumps([VERSION, seed, num_train, num_val, image_size])
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def generate(out: str | Path, *, seed: int = 0, num_train: int = 600, num_val: int = 100, image_size: int = 256) -> SynthStats:
    """Write ``out/{train,val}/*.jpg`` and ``out/annotations/instances_{train,val}.json``."""
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    total = SynthStats(0, 0, 0, float("inf"), 0.0)
    for split, count, split_seed in (("train", num_train, 0), ("val", num_val, 1)):
        (out / split).mkdir(exist_ok=True)
        images, anns = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_seed, i])
            pixels, objs = draw_image(rng, image_size)
            name = f"{i:06d}.jpg"
            Image.fromarray(pixels).save(out / split / name, quality=95)
            image_id = i + 1
            images.append({"id": image_id, "file_name": name, "height": image_size, "width": image_size})
            for obj in objs:
                rle = mask_utils.encode(np.asfortranarray(obj["visible"].astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                rle["counts"] = rle["counts"].decode("ascii")
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": obj["cls"] + 1,
                             "segmentation": rle, "area": float(obj["visible"].sum()), "bbox": [x, y, w, h],
                             "iscrowd": 0})
                total = SynthStats(total.images, total.instances + 1, total.occluded + obj["occluded"],
                                   min(total.min_extent, max(w, h)), max(total.max_extent, max(w, h)))
            total = SynthStats(total.images + 1, *list(vars(total).values())[1:])
        info = {"description": "scratchdet synthetic shapes", "version": VERSION, "seed": seed}
        with open(out / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump({"info": info, "images": images, "annotations": anns, "categories": categories}, f)
    with open(out / "stats.json", "w") as f:
        json.dump(vars(total), f, indent=1)
    return total


# --------------------------------------------------------------------------- keypoints

# Each shape's four extreme points (ExtremeNet's keypoints: Zhou et al., 2019), found on its visible mask, so
# every one is labelled and visible and any shape, rotated or not, has them; a flip swaps left and right.
KEYPOINT_NAMES = ("top", "right", "bottom", "left")
KEYPOINT_SKELETON = [[1, 2], [2, 3], [3, 4], [4, 1]]


def extreme_points(mask: np.ndarray) -> list[int]:
    """COCO keypoints ``[x, y, 2] * 4`` (integer pixel indices) of a [H, W] mask's top, right, bottom and left
    extreme points; where several pixels tie, the middle one of them."""
    ys, xs = np.nonzero(mask)
    out: list[int] = []
    for coords, other, pick in ((ys, xs, ys.min()), (xs, ys, xs.max()), (ys, xs, ys.max()), (xs, ys, xs.min())):
        ties = np.sort(other[coords == pick])
        mid = int(ties[len(ties) // 2])
        x, y = (mid, int(pick)) if coords is ys else (int(pick), mid)
        out += [x, y, 2]
    return out


def write_keypoints(root: str | Path) -> None:
    """Write ``annotations/keypoints_{train,val}.json`` beside the instances files: the same images and
    instances, each with its ``KEYPOINT_NAMES`` extreme points, in COCO's person-keypoints format (every
    category lists the same keypoint names)."""
    root = Path(root)
    for split in ("train", "val"):
        with open(root / "annotations" / f"instances_{split}.json") as f:
            data = json.load(f)
        for c in data["categories"]:
            c["keypoints"], c["skeleton"] = list(KEYPOINT_NAMES), KEYPOINT_SKELETON
        for ann in data["annotations"]:
            mask = mask_utils.decode({"size": ann["segmentation"]["size"],
                                      "counts": ann["segmentation"]["counts"].encode("ascii")})
            ann["keypoints"], ann["num_keypoints"] = extreme_points(mask), len(KEYPOINT_NAMES)
        out = root / "annotations" / f"keypoints_{split}.json"
        # Written whole, then renamed: a reader (another process of the same run) never sees half a file.
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, out)


def default_root() -> Path:
    return Path(os.environ.get("SCRATCHDET_CACHE", Path.home() / ".cache" / "scratchdet"))


def ensure(*, seed: int, num_train: int, num_val: int, image_size: int, root: str = "", keypoints: bool = False) -> Path:
    """Generate the dataset once into a cache folder (atomically) and return that folder; with ``keypoints``
    also its keypoint annotations (``write_keypoints``, once)."""
    path = _ensure_instances(seed=seed, num_train=num_train, num_val=num_val, image_size=image_size, root=root)
    if keypoints and not (path / "annotations" / "keypoints_val.json").is_file():
        write_keypoints(path)  # the val file is written last: its presence means both are complete
    return path


def _ensure_instances(*, seed: int, num_train: int, num_val: int, image_size: int, root: str = "") -> Path:
    sig = signature(seed=seed, num_train=num_train, num_val=num_val, image_size=image_size)
    path = Path(root) if root else default_root() / f"synth-{sig}"
    if (path / "DONE").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp", dir=path.parent))
    try:
        generate(tmp, seed=seed, num_train=num_train, num_val=num_val, image_size=image_size)
        (tmp / "DONE").write_text(sig + "\n")
        if (path / "DONE").is_file():  # another process finished first (and may be reading it): keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
            return path
        if path.exists():  # a half-written folder from a killed run (no DONE): replace it
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (path / "DONE").is_file():  # another process finished first
            return path
        raise
    return path


# --------------------------------------------------------------------------- classification crops

# The classification images are drawn from their own stream (split seed 2; detection uses 0 for
# train and 1 for val), so pre-training never sees the detection validation images.
CLS_SPLIT_SEED = 2
CLS_MIN_EXTENT = 12  # smaller objects upsampled to the crop size are mostly blur


@dataclass(frozen=True)
class ClsStats:
    images: int  # crops written
    source_images: int  # synthetic scenes drawn to get them
    per_class: int
    size: int


def generate_cls(out: str | Path, *, seed: int = 0, per_class: int = 300, size: int = 64, scene_size: int = 256,
                 context: float = 1.4, classes: str = "target") -> ClsStats:
    """Write an ImageFolder ``out/<class>/NNNNNN.png`` of square crops around synthetic shapes.

    Each crop is an object's box widened by ``context`` (so occluders, clutter and background come
    with it, as an ImageNet photo's do), resized to ``size``; classes are balanced (``per_class``
    each).  ``classes``: ``target`` (the detection set's six shapes: in-domain labelled data) or
    ``other`` (eight shapes the detection set never holds: an ImageNet stand-in).  Deterministic
    for a seed: scene ``i`` is drawn from ``(seed, 2, i)``.
    """
    if classes not in CLASS_SETS:
        raise ValueError(f"classes: one of {', '.join(CLASS_SETS)} (got {classes!r})")
    names = CLASS_SETS[classes]
    out = Path(out)
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
    counts = [0] * len(names)
    scenes = 0
    while min(counts) < per_class:
        rng = np.random.default_rng([seed, CLS_SPLIT_SEED, scenes])
        pixels, objs = draw_image(rng, scene_size, names)
        scenes += 1
        image = Image.fromarray(pixels)
        for obj in objs:
            if counts[obj["cls"]] >= per_class:
                continue
            ys, xs = np.nonzero(obj["visible"])
            x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            if max(x1 - x0, y1 - y0) < CLS_MIN_EXTENT:
                continue
            side = min(scene_size, round(max(x1 - x0, y1 - y0) * context))
            # Centred on the object, shifted (not cut) to stay inside the scene: crops stay square.
            left = int(np.clip(round((x0 + x1 - side) / 2), 0, scene_size - side))
            top = int(np.clip(round((y0 + y1 - side) / 2), 0, scene_size - side))
            crop = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
            crop.save(out / names[obj["cls"]] / f"{counts[obj['cls']]:06d}.png")
            counts[obj["cls"]] += 1
    stats = ClsStats(images=sum(counts), source_images=scenes, per_class=per_class, size=size)
    with open(out / "synth_cls.json", "w") as f:
        json.dump({"version": VERSION, "seed": seed, "scene_size": scene_size, "context": context,
                   "class_set": classes, "classes": list(names), **vars(stats)}, f, indent=1)
    return stats
