"""COCO-format datasets, transforms (torchvision.transforms.v2 on tv_tensors) and the sampler.

Augmentation randomness is a pure function of the run's seed and the sample's position in
the training stream (``TrainSampler`` hands each index its own seed), never of a worker's RNG
state.  That is what makes resume exact with any number of workers: the checkpoint need only
hold the sampler's position.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import signal
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Input that cannot be used; the message names the file and the image or annotation id."""


@dataclass
class ImageRecord:
    id: int
    file_name: str
    height: int
    width: int
    anns: list[dict] = field(default_factory=list)


@dataclass
class LoadReport:
    """What was repaired or left out while reading a dataset, counted by reason."""

    skipped: Counter = field(default_factory=Counter)

    def add(self, reason: str, what: str) -> None:
        if not self.skipped[reason]:
            log.warning("%s (first case: %s); such cases are skipped and counted", reason, what)
        self.skipped[reason] += 1

    def summary(self) -> str:
        return "; ".join(f"{n} x {r}" for r, n in self.skipped.items()) or "nothing skipped"


# A bbox side moved by clipping less than this is float rounding, not a repair: x + w of a box
# inside the image can exceed the width by an ulp (about 1e-12 px at 10^4 px).
ROUNDING_PX = 1e-6


def _read_json_object(path: Path) -> dict:
    """A COCO JSON file's top-level object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    return data


def _parse_categories(path: Path, entries: Any) -> list[dict]:
    """The file's categories as ``{"id", "name"}``: a list of objects with unique integer ids."""
    if not isinstance(entries, list):
        raise DataError(f"{path}: missing or non-list 'categories'")
    categories = []
    cat_ids: set[int] = set()
    for c in entries:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
            raise DataError(f"{path}: category {c!r} has no integer 'id'")
        if c["id"] in cat_ids:
            raise DataError(f"{path}: duplicate category id {c['id']}")
        cat_ids.add(c["id"])
        categories.append({"id": c["id"], "name": str(c.get("name", c["id"]))})
    return categories


def check_categories(label_to_cat_id: dict[int, int], annotations: str | Path, *, what: str = "validation set") -> None:
    """Raise DataError unless the file's category ids are the training label map's (order and names may differ)."""
    path = Path(annotations)
    file_ids = {c["id"] for c in _parse_categories(path, _read_json_object(path).get("categories"))}
    train_ids = set(label_to_cat_id.values())
    if file_ids != train_ids:
        # Labels are mapped to category ids through the training set's map: any difference would
        # score detections against the wrong categories, or against none.
        raise DataError(f"{path}: {what} categories differ from the training set's (ids decide): ids only in the "
                        f"training set: {sorted(train_ids - file_ids)}; only in this file: {sorted(file_ids - train_ids)}")


def _as_float(v: Any) -> float | None:
    """A JSON number as a float; None for anything else, bools and integers beyond float range."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:  # JSON allows 10**400
        return None


def load_coco_json(path: str | Path, *, task: str = "masks") -> tuple[list[ImageRecord], list[dict], LoadReport]:
    """Read a COCO instances JSON into image records (annotations attached) and its categories.

    ``task`` says what the targets need: ``masks`` checks segmentations; ``boxes`` and ``keypoints``
    leave them unread; ``keypoints`` checks each annotation's ``keypoints`` against the categories'
    keypoint names (every category's ``keypoints`` entry, then, is the same list of names)."""
    path = Path(path)
    data = _read_json_object(path)
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or non-list '{key}'")
    report = LoadReport()
    categories = _parse_categories(path, data["categories"])
    num_keypoints = 0
    if task == "keypoints":
        names = keypoint_layout(path, data["categories"])
        num_keypoints = len(names)
        for c in categories:  # returned with them: the JSON is read once (COCO's person keypoints: 240 MB)
            c["keypoints"] = list(names)
    cat_ids = {c["id"] for c in categories}
    records: dict[int, ImageRecord] = {}
    for im in data["images"]:
        if not isinstance(im, dict):
            raise DataError(f"{path}: image entry {im!r} is not an object")
        for key, tp in (("id", int), ("file_name", str), ("height", int), ("width", int)):
            if not isinstance(im.get(key), tp) or isinstance(im.get(key), bool):
                raise DataError(f"{path}: image id {im.get('id')!r}: missing or mistyped '{key}'")
        if im["height"] <= 0 or im["width"] <= 0:
            raise DataError(f"{path}: image id {im['id']}: height and width must be positive")
        if im["id"] in records:
            raise DataError(f"{path}: duplicate image id {im['id']}")
        records[im["id"]] = ImageRecord(im["id"], im["file_name"], im["height"], im["width"])
    ann_ids: set[int] = set()
    annotations = data.get("annotations")
    if annotations is None:
        annotations = []
    if not isinstance(annotations, list):
        raise DataError(f"{path}: 'annotations' must be a list")
    for ann in annotations:
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotation entry {ann!r} is not an object")
        aid = ann.get("id")
        if not isinstance(aid, int) or isinstance(aid, bool):
            raise DataError(f"{path}: annotation {ann!r:.80}: missing or mistyped 'id'")
        if aid in ann_ids:
            raise DataError(f"{path}: duplicate annotation id {aid}")
        ann_ids.add(aid)
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        rec = records.get(image_id) if isinstance(image_id, int) else None
        if rec is None:
            raise DataError(f"{path}: annotation id {aid} refers to unknown image id {image_id!r}")
        if not isinstance(category_id, int) or category_id not in cat_ids:
            raise DataError(f"{path}: annotation id {aid} (image id {rec.id}) has unknown category id "
                            f"{category_id!r}")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):  # also accepts False/True
            raise DataError(f"{path}: annotation id {aid} (image id {rec.id}): 'iscrowd' must be 0 or 1, got {crowd!r}")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise DataError(f"{path}: annotation id {aid} (image id {rec.id}): 'bbox' must be [x, y, w, h]")
        what = f"{path} annotation id {aid} (image id {rec.id})"
        values = [_as_float(v) for v in bbox]
        if not all(v is not None and math.isfinite(v) for v in values):
            report.add("annotations with a non-finite bbox", what)
            continue
        x, y, w, h = values
        if w <= 0 or h <= 0:
            report.add("annotations with an empty bbox (w or h <= 0)", what)
            continue
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, rec.width), min(y + h, rec.height)
        if x1 <= x0 or y1 <= y0:
            report.add("annotations whose bbox lies outside the image", what)
            continue
        # Compare the sides, not [x0, y0, x1 - x0, y1 - y0] with the bbox: x1 - x0 recomputed in
        # floating point differs from w (12.5 + 7.45 - 12.5 != 7.45) for most boxes inside the image.
        if max(x0 - x, y0 - y, (x + w) - x1, (y + h) - y1) > ROUNDING_PX:
            report.add("bboxes clipped to the image (repaired)", what)
            ann = {**ann, "bbox": [x0, y0, x1 - x0, y1 - y0]}
        if num_keypoints:
            ann = _check_keypoints(path, ann, rec, num_keypoints, report, what)
        if not crowd and task == "masks":
            seg, problems = _check_segmentation(ann.get("segmentation"), rec.height, rec.width)
            for problem in problems:
                report.add(problem, what)
            if seg is None:
                continue
            ann = {**ann, "segmentation": seg}
        rec.anns.append(ann)
    return list(records.values()), categories, report


def keypoint_layout(path: Path, entries: list) -> list[str]:
    """The keypoint names every category shares (COCO person keypoints: a category's ``keypoints`` list)."""
    layouts = {}
    for c in entries:
        names = c.get("keypoints")
        if names is None:
            continue
        if (not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names)
                or len(set(names)) != len(names)):
            raise DataError(f"{path}: category id {c['id']}: 'keypoints' must be a non-empty list of distinct names")
        layouts[c["id"]] = names
    if not layouts:
        raise DataError(f"{path}: no category has a 'keypoints' list of names: model.task keypoints needs a COCO "
                        "person-keypoints file (see the README, 'Keypoints')")
    first_id, names = next(iter(layouts.items()))
    for c in entries:
        # Keypoint R-CNN's head predicts one set of K heatmaps for every class (torchvision, detectron2).
        if layouts.get(c["id"]) != names:
            raise DataError(f"{path}: categories {first_id} and {c['id']} have different 'keypoints' lists; one keypoint "
                            "layout is shared by every category")
    keypoint_flip_index(names, where=str(path))  # an unpaired left/right name is found now
    return names


def keypoint_flip_index(names: Sequence[str], *, where: str = "") -> list[int]:
    """``index[k]``: the keypoint that keypoint ``k`` becomes under a horizontal flip ("left" and "right" swapped
    wherever they occur in its name, any case: left_eye <-> right_eye as detectron2's KEYPOINT_FLIP_MAP pairs
    COCO's, and left-eye, leftEye, LEFT_EYE alike).  Test-time augmentation flips with the same map."""
    def swap(m: re.Match) -> str:
        w = m.group(0)
        other = "right" if w.lower() == "left" else "left"
        return other.upper() if w.isupper() else other.capitalize() if w[0].isupper() else other

    position = {n: k for k, n in enumerate(names)}
    index = []
    for n in names:
        partner = re.sub(r"left|right", swap, n, flags=re.IGNORECASE)
        if partner not in position:
            raise DataError(f"{where}: keypoint {n!r} has no {partner!r}: a horizontal flip would make it the wrong "
                            "keypoint (name both sides, or set data.flip_prob=0)")
        index.append(position[partner])
    return index


# COCO's keypoint visibility flags: 0 not labelled (x = y = 0), 1 labelled but hidden, 2 labelled and visible.
_VISIBILITY = (0, 1, 2)


def _check_keypoints(path: Path, ann: dict, rec: ImageRecord, k: int, report: LoadReport, what: str) -> dict:
    """The annotation with its keypoints checked: structure (an error), labelled points outside the image or
    non-finite (marked unlabelled, counted)."""
    aid = ann["id"]
    kps = ann.get("keypoints")
    if not isinstance(kps, list) or len(kps) != 3 * k or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in kps):
        raise DataError(f"{path}: annotation id {aid} (image id {rec.id}): 'keypoints' must be a list of 3 x {k} numbers "
                        "(x, y, visibility per keypoint)")
    vis = kps[2::3]
    if not all(v in _VISIBILITY for v in vis):
        raise DataError(f"{path}: annotation id {aid} (image id {rec.id}): keypoint visibility must be 0, 1 or 2, "
                        f"got {sorted({v for v in vis if v not in _VISIBILITY}, key=str)}")
    labelled = sum(v > 0 for v in vis)
    # COCOeval ignores a ground truth whose num_keypoints is 0 (faster-coco-eval reads a missing one as 0),
    # and scales OKS by its area: without them evaluation would be silently wrong.
    if ann.get("num_keypoints") != labelled or isinstance(ann.get("num_keypoints"), bool):
        raise DataError(f"{path}: annotation id {aid} (image id {rec.id}): 'num_keypoints' must be the number of "
                        f"labelled keypoints ({labelled}), got {ann.get('num_keypoints')!r}")
    area = _as_float(ann.get("area"))
    if area is None or not math.isfinite(area) or area < 0:
        raise DataError(f"{path}: annotation id {aid} (image id {rec.id}): 'area' must be a finite number >= 0 "
                        "(keypoint AP's OKS scales by it)")
    out = list(kps)
    for j in range(k):
        if not out[3 * j + 2]:
            continue
        x, y = _as_float(out[3 * j]), _as_float(out[3 * j + 1])
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            report.add("keypoints with non-finite coordinates marked unlabelled (repaired)", what)
        elif not (0 <= x <= rec.width and 0 <= y <= rec.height):
            report.add("keypoints outside the image marked unlabelled (repaired)", what)
        else:
            continue
        out[3 * j:3 * j + 3] = [0, 0, 0]
    return ann if out == kps else {**ann, "keypoints": out}


def _check_segmentation(seg: Any, height: int, width: int) -> tuple[Any, list[str]]:
    """``(usable segmentation or None, what was wrong or repaired)`` for a non-crowd annotation."""
    if isinstance(seg, list):
        good = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                and all(v is not None and math.isfinite(v) for v in map(_as_float, p))]
        if not good:
            return None, ["annotations without a polygon of 3 or more finite points"]
        # The rasteriser walks every polygon edge at 5x resolution, wherever it lies: a point at 1e7 px
        # costs a gigabyte, at 1e9 it fails. Up to one image side outside is any real polygon's slack.
        near = [p for p in good if all(-width <= v <= 2 * width for v in p[0::2])
                and all(-height <= v <= 2 * height for v in p[1::2])]
        if not near:
            return None, ["annotations whose polygons all reach far outside the image"]
        problems = []
        if len(good) < len(seg):
            problems.append("polygons with fewer than 3 points dropped (repaired)")
        if len(near) < len(good):
            problems.append("polygons reaching far outside the image dropped (repaired)")
        return near, problems
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if seg["size"] != [height, width]:
            return None, ["annotations whose RLE size disagrees with the image size"]
        runs = _rle_runs(seg["counts"])
        # The mask library refuses counts that do not cover the image exactly, or negative ones:
        # found here, not as an exception in a loader worker hours into training.
        if runs is None or min(runs, default=0) < 0 or sum(runs) != height * width:
            return None, ["annotations with malformed RLE counts (not summing to height x width)"]
        return {"size": [height, width], "counts": seg["counts"]}, []
    return None, ["annotations without a usable segmentation (polygons or RLE)"]


def _rle_runs(counts: Any) -> list[int] | None:
    """The run lengths of uncompressed (list) or compressed (COCO string) RLE counts; None if malformed."""
    if isinstance(counts, list):
        return counts if all(isinstance(c, int) and not isinstance(c, bool) for c in counts) else None
    if not isinstance(counts, str):
        return None
    # cocoapi's rleFrString: each run is 5-bit groups in characters '0'..'o' (0x20: more groups
    # follow, 0x10 in the last group: negative), and from the third run on a delta to the run two back.
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x = k = 0
        more = True
        while more:
            if p == len(counts):
                return None  # the string ends inside a run
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        runs.append(x + runs[-2] if len(runs) > 2 else x)
    return runs


def _mask_runs(ann: dict, height: int, width: int, where: str) -> np.ndarray:
    """An annotation's segmentation (polygons, RLE or compressed RLE) as uncompressed RLE: run lengths
    over the column-major [H, W] mask, alternating background and foreground, starting with background."""
    # faster-coco-eval's C mask library, imported where masks are decoded: a module that imports
    # the data pipeline (the training step's benchmarks) runs where it is absent until masks are read.
    import faster_coco_eval.core.mask as mask_utils
    import faster_coco_eval.mask_api_new_cpp as _mask_api

    seg = ann.get("segmentation")
    try:
        if isinstance(seg, list):
            polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
            if not polys:
                raise DataError(f"{where}: annotation id {ann['id']}: no polygon with 3 or more points")
            rles = mask_utils.frPyObjects([[float(v) for v in p] for p in polys], height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if seg["size"] != [height, width]:
                raise DataError(f"{where}: annotation id {ann['id']}: RLE size {seg['size']} disagrees with the "
                                f"image's {height}x{width}")
            rle = seg
        else:
            raise DataError(f"{where}: annotation id {ann['id']}: 'segmentation' is neither polygons nor RLE")
        counts = rle["counts"]
        if not isinstance(counts, list):  # the C library reads the compressed string
            counts = _mask_api.toUncompressedRLE([rle])[0]["counts"]
        runs = np.asarray(counts, dtype=np.int64)
    except DataError:
        raise
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        # load_coco_json's checks keep such annotations out; this names one that reached here anyway.
        raise DataError(f"{where}: annotation id {ann['id']}: cannot decode its segmentation ({e})") from None
    if runs.ndim != 1 or (runs < 0).any() or int(runs.sum()) != height * width:
        raise DataError(f"{where}: annotation id {ann['id']}: cannot decode its segmentation (RLE counts do not "
                        f"cover {height}x{width})")
    return runs


def _span(index_map: np.ndarray | None, lo: int, hi: int) -> tuple[slice, slice | np.ndarray] | None:
    """Where a source range ``[lo, hi]`` lands under an output->source index map (None: identity):
    ``(output slice, source positions relative to lo)``, or None if no output position reads from it.

    The maps are monotone (nearest-neighbour resizing, possibly reversed by a flip), so the output
    positions reading from an interval form an interval too."""
    if index_map is None:
        return slice(lo, hi + 1), slice(None)
    hit = np.flatnonzero((index_map >= lo) & (index_map <= hi))
    if not len(hit):
        return None
    dst, src = slice(int(hit[0]), int(hit[-1]) + 1), index_map[hit[0]:hit[-1] + 1] - lo
    first, n = int(src[0]), len(src)
    # A plain range, forward or reversed (a flip), is read as a view instead of a gather.
    if np.array_equal(src, np.arange(first, first + n)):
        return dst, slice(first, first + n)
    if np.array_equal(src, np.arange(first, first - n, -1)):
        return dst, slice(first, first - n if first >= n else None, -1)
    return dst, src


class InstanceMasks:
    """An image's instance masks, kept as run lengths until rendered.

    ``render`` decodes each mask only over its extent (the columns it touches, the rows it touches)
    and writes it straight into its place in the output, at the output size and orientation: a
    resize, a flip or a dropped instance costs no full-size intermediate mask.
    """

    def __init__(self, runs: list[np.ndarray], height: int, width: int) -> None:
        self.runs, self.height, self.width = runs, height, width

    @classmethod
    def from_annotations(cls, anns: Sequence[dict], height: int, width: int, where: str) -> InstanceMasks:
        return cls([_mask_runs(a, height, width, where) for a in anns], height, width)

    def __len__(self) -> int:
        return len(self.runs)

    def render(self, rows: np.ndarray | None = None, cols: np.ndarray | None = None,
               keep: Sequence[int] | None = None) -> np.ndarray:
        """``[len(keep), len(rows), len(cols)]`` uint8 masks: ``out[k, i, j] = mask[keep[k]][rows[i], cols[j]]``
        (``rows``/``cols`` None: all, in order; ``keep`` None: every instance). The maps must be monotone."""
        h = self.height
        out_h = h if rows is None else len(rows)
        out_w = self.width if cols is None else len(cols)
        keep = range(len(self.runs)) if keep is None else keep
        out = np.zeros((len(keep), out_h, out_w), dtype=np.uint8)
        for k, n in enumerate(keep):
            runs = self.runs[n]
            ends = np.cumsum(runs)
            starts = ends - runs
            # Foreground runs are the odd ones; column-major, so a position p is (row p % h, column p // h).
            fg_start, fg_end = starts[1::2], ends[1::2]
            nonempty = fg_end > fg_start
            fg_start, fg_end = fg_start[nonempty], fg_end[nonempty]
            if not len(fg_start):
                continue
            x0, x1 = int(fg_start[0]) // h, (int(fg_end[-1]) - 1) // h
            first_col, last_col = fg_start // h, (fg_end - 1) // h
            if (first_col != last_col).any():  # a run crosses a column boundary: it may cover any row
                y0, y1 = 0, h - 1
            else:
                y0, y1 = int((fg_start % h).min()), int(((fg_end - 1) % h).max())
            row_span, col_span = _span(rows, y0, y1), _span(cols, x0, x1)
            if row_span is None or col_span is None:
                continue
            # Decode the columns x0..x1 only: every run clipped to them, then repeated.
            lo, hi = x0 * h, (x1 + 1) * h
            lengths = np.clip(np.minimum(ends, hi) - np.maximum(starts, lo), 0, None)
            band = np.repeat((np.arange(len(runs)) & 1).astype(np.uint8), lengths)
            crop = band.reshape(x1 - x0 + 1, h)[:, y0:y1 + 1].T  # [rows y0..y1, columns x0..x1]
            out[k, row_span[0], col_span[0]] = crop[row_span[1]][:, col_span[1]]
        return out


def decode_mask(ann: dict, height: int, width: int, where: str) -> np.ndarray:
    """An annotation's segmentation (polygons, RLE or compressed RLE) as a [H, W] uint8 mask."""
    return InstanceMasks.from_annotations([ann], height, width, where).render()[0]


@functools.lru_cache(maxsize=1024)
def _nearest_index(size: int, new_size: int) -> np.ndarray | None:
    """The source position of each output position when torchvision resizes a uint8 mask from ``size`` to
    ``new_size`` (torch's nearest-neighbour interpolation, one axis); None when nothing moves.

    Read from torch itself, by resizing the positions written as base-256 digits in uint8 channels: the
    kernel of the masks' own dtype, whose scale is a float32 (a float64 probe rounds differently), so
    exact by construction."""
    if size == new_size:
        return None
    positions = torch.arange(size)
    places = max(1, ((size - 1).bit_length() + 7) // 8)
    digits = torch.stack([(positions >> 8 * k) & 255 for k in range(places)]).to(torch.uint8)
    index = torch.nn.functional.interpolate(digits.reshape(1, places, size, 1), size=(new_size, 1), mode="nearest")
    index = sum(index.reshape(places, new_size)[k].long() << 8 * k for k in range(places)).numpy()
    index.flags.writeable = False  # shared by every caller through the cache
    return index


class ResizeShortestEdge(v2.Transform):
    """Resize so the shorter side is one of ``min_sizes`` (drawn per image) and the longer at most
    ``max_size`` (detectron2's ResizeShortestEdge; torchvision's Resize refuses max_size == size)."""

    def __init__(self, min_sizes: Sequence[int], max_size: int) -> None:
        super().__init__()
        self.min_sizes, self.max_size = [int(s) for s in min_sizes], int(max_size)

    def make_params(self, flat_inputs: list[Any], size: int | None = None) -> dict[str, Any]:
        """The output size; ``size`` given (a shorter side drawn once for the whole batch, ``TrainSampler(sizes=)``),
        nothing is drawn here."""
        h, w = v2.query_size(flat_inputs)
        if size is None:
            size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))] if len(self.min_sizes) > 1 \
                else self.min_sizes[0]
        scale = size / min(h, w)
        if max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        return {"size": (int(h * scale + 0.5), int(w * scale + 0.5)), "unchanged": abs(scale - 1) < 1e-9}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["unchanged"]:
            return inpt
        return self._call_kernel(v2.functional.resize, inpt, params["size"], antialias=True)


class DetectionTransforms(v2.Compose):
    """``build_transforms``' pipeline: ResizeShortestEdge, RandomHorizontalFlip (training), SanitizeBoundingBoxes.

    Called as a ``v2.Compose`` it transforms tv_tensors as torchvision does.  CocoDetection calls
    ``apply`` instead: the same random draws in the same order and the same output, bit for bit
    (tests/test_data.py compares the two), without the full-size intermediates. An image that keeps its
    size is flipped before it becomes a tensor; each mask is decoded once, within its extent, straight
    at its final size and orientation, and only if its box survives.
    """

    def __init__(self, resize: ResizeShortestEdge, flip: v2.RandomHorizontalFlip | None,
                 sanitize: v2.SanitizeBoundingBoxes) -> None:
        super().__init__([t for t in (resize, flip, sanitize) if t is not None])

    # Read from the Compose's list (attributes would register each transform a second time as a submodule).
    @property
    def resize(self) -> ResizeShortestEdge:
        return self.transforms[0]

    @property
    def flip(self) -> v2.RandomHorizontalFlip | None:
        return self.transforms[1] if len(self.transforms) == 3 else None

    @property
    def sanitize(self) -> v2.SanitizeBoundingBoxes:
        return self.transforms[-1]

    def apply(self, image: Image.Image, boxes: tv_tensors.BoundingBoxes, labels: torch.Tensor,
              masks: InstanceMasks | None, keypoints: torch.Tensor | None = None,
              flip_index: Sequence[int] | None = None, *, size: int | None = None) -> tuple[torch.Tensor, ...]:
        """``(image [3, H, W] uint8, boxes [N, 4], labels [N], masks [N, H, W] uint8)`` as ``self(image, target)``
        returns them (plain tensors) for the image as a tensor and ``masks.render()`` as its masks; masks None
        when ``masks`` is None. With ``keypoints`` [N, K, 3] (x, y, visibility; continuous pixel coordinates) a
        fifth item, the keypoints moved along (swapped by ``flip_index`` on a flip, see ``_finish_keypoints``).
        ``size``: the shorter side, drawn for the whole batch (``TrainSampler(sizes=)``) instead of here."""
        # Compose.forward's draws, in its order: the resize's size (unless given), then the flip's coin (flip when
        # rand < p).
        params = self.resize.make_params([image], size)
        flip = self.flip is not None and not bool(torch.rand(1) >= self.flip.p)
        height, width = boxes.canvas_size
        if keypoints is not None:
            # Boxes and keypoints scale alike (torchvision's resize_keypoints: by new/old size per axis).
            size = (height, width) if params["unchanged"] else params["size"]
            keypoints = _move_keypoints(keypoints, scale=(size[1] / width, size[0] / height))
        if params["unchanged"]:
            pixels = image_to_chw(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image)
            rows = cols = None
        else:
            pixels = self.resize.transform(tv_tensors.Image(image_to_chw(image)), params).as_subclass(torch.Tensor)
            if flip:
                # After the resize, as torchvision (antialiased resizing and flipping do not commute exactly); a
                # numpy copy, as torch.flip in the main process waits for its threads like image_to_chw's permute.
                pixels = torch.from_numpy(np.ascontiguousarray(pixels.numpy()[..., ::-1]))
            boxes = self.resize.transform(boxes, params)
            rows, cols = _nearest_index(height, boxes.canvas_size[0]), _nearest_index(width, boxes.canvas_size[1])
        if flip:
            boxes = self.flip.transform(boxes, {})
            cols = (np.arange(width) if cols is None else cols)[::-1]
        # As plain tensors: the same function, without a tv_tensor's per-operation dispatch.
        boxes, valid = v2.functional.sanitize_bounding_boxes(boxes.as_subclass(torch.Tensor), format=boxes.format,
                                                             canvas_size=boxes.canvas_size, min_size=self.sanitize.min_size,
                                                             min_area=self.sanitize.min_area)
        keep = np.flatnonzero(valid.numpy())
        out = (pixels, boxes, labels[valid], None if masks is None else torch.from_numpy(masks.render(rows, cols, keep)))
        if keypoints is None:
            return out
        return (*out, _finish_keypoints(keypoints[valid], tuple(pixels.shape[-2:]), flip, flip_index))


def _move_keypoints(keypoints: torch.Tensor, *, scale: tuple[float, float] = (1.0, 1.0),
                    shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """``keypoints`` [N, K, 3] with x, y scaled, then shifted; visibility kept."""
    out = keypoints.clone()
    out[..., 0] = out[..., 0] * scale[0] + shift[0]
    out[..., 1] = out[..., 1] * scale[1] + shift[1]
    return out


def _finish_keypoints(keypoints: torch.Tensor, hw: tuple[int, int], flip: bool,
                      flip_index: Sequence[int] | None) -> torch.Tensor:
    """Keypoints [N, K, 3] on the final [H, W] canvas: mirrored (x -> W - x, as boxes, in continuous coordinates)
    and left/right swapped on a flip; points outside the canvas, e.g. cut off by a crop, unlabelled (detectron2's
    transform_keypoint_annotations); unlabelled points at (0, 0, 0), COCO's convention."""
    h, w = hw
    keypoints = keypoints.clone()
    if flip:
        if flip_index is None:
            raise ValueError("flipping keypoints needs their flip_index (left/right pairs)")
        keypoints[..., 0] = w - keypoints[..., 0]
        keypoints = keypoints[:, list(flip_index)]
    x, y = keypoints[..., 0], keypoints[..., 1]
    outside = (x < 0) | (x > w) | (y < 0) | (y > h)
    keypoints[outside] = 0.0
    keypoints[keypoints[..., 2] == 0] = 0.0
    return keypoints


def build_transforms(*, train: bool, min_sizes: Sequence[int], max_size: int, flip_prob: float) -> DetectionTransforms:
    """Resize the shorter side (one of ``min_sizes``, drawn per image) capping the longer; flip."""
    return DetectionTransforms(ResizeShortestEdge(min_sizes, max_size),
                               v2.RandomHorizontalFlip(flip_prob) if train and flip_prob > 0 else None,
                               v2.SanitizeBoundingBoxes(min_size=1))  # boxes that shrank below a pixel, with their masks


class LargeScaleJitter(v2.Transform):
    """Large-scale jitter (detectron2's ResizeScale + FixedSizeCrop, its new baselines): resize to fit a square of
    ``size * s`` with ``s`` uniform in ``scale``, then crop a random ``size`` x ``size`` window where the image is
    larger, and pad right and bottom to ``size`` x ``size`` where it is smaller (image with ``fill``, masks with 0)."""

    # detectron2's FixedSizeCrop pads the image with 128, about the pixel mean: near 0 once normalized.
    FILL = 128

    def __init__(self, *, size: int, scale: Sequence[float] = (0.1, 2.0)) -> None:
        super().__init__()
        self.size, self.scale = int(size), (float(scale[0]), float(scale[-1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        s = self.scale[0] + float(torch.rand(())) * (self.scale[1] - self.scale[0])
        factor = min(self.size * s / h, self.size * s / w)
        nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
        # The crop's offset: a uniform fraction of the slack, rounded (FixedSizeCrop); 0 where nothing sticks out.
        u = torch.rand(2)
        top, left = int(round(float(u[0]) * max(nh - self.size, 0))), int(round(float(u[1]) * max(nw - self.size, 0)))
        return {"size": (nh, nw), "unchanged": (nh, nw) == (h, w),
                "crop": (top, left, min(nh, self.size), min(nw, self.size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["unchanged"]:
            inpt = self._call_kernel(v2.functional.resize, inpt, params["size"], antialias=True)
        top, left, ch, cw = params["crop"]
        inpt = self._call_kernel(v2.functional.crop, inpt, top, left, ch, cw)
        fill = self.FILL if isinstance(inpt, tv_tensors.Image) else 0
        return self._call_kernel(v2.functional.pad, inpt, [0, 0, self.size - cw, self.size - ch], fill=fill)


class LSJTransforms(DetectionTransforms):
    """``build_lsj_transforms``' pipeline: LargeScaleJitter, RandomHorizontalFlip, SanitizeBoundingBoxes
    (detectron2's order: the flip comes last, so the padding may end up on the left).

    ``apply`` gives what ``self(image, target)`` gives (tests/test_keypoints.py compares them), masks decoded once
    at their final size as in ``DetectionTransforms.apply``."""

    def apply(self, image: Image.Image, boxes: tv_tensors.BoundingBoxes, labels: torch.Tensor,
              masks: InstanceMasks | None, keypoints: torch.Tensor | None = None,
              flip_index: Sequence[int] | None = None, *, size: int | None = None) -> tuple[torch.Tensor, ...]:
        """As ``DetectionTransforms.apply``: image [3, S, S], boxes [N, 4], labels [N], masks [N, S, S] or None,
        and keypoints [N, K, 3] when given. ``size`` must be None: LSJ draws its own scale per image."""
        if size is not None:
            raise ValueError("large-scale jitter draws its scale per image: a size drawn per batch does not apply")
        jitter: LargeScaleJitter = self.resize
        params = jitter.make_params([image])
        flip = self.flip is not None and not bool(torch.rand(1) >= self.flip.p)
        height, width = boxes.canvas_size
        (nh, nw), (top, left, ch, cw), side = params["size"], params["crop"], jitter.size
        pixels = jitter.transform(tv_tensors.Image(image_to_chw(image)), params).as_subclass(torch.Tensor)
        boxes = jitter.transform(boxes, params)
        if flip:
            # A numpy copy, as in DetectionTransforms.apply (torch.flip waits for its threads in the main process).
            pixels = torch.from_numpy(np.ascontiguousarray(pixels.numpy()[..., ::-1]))
            boxes = self.flip.transform(boxes, {})
        boxes, valid = v2.functional.sanitize_bounding_boxes(boxes.as_subclass(torch.Tensor), format=boxes.format,
                                                             canvas_size=boxes.canvas_size, min_size=self.sanitize.min_size,
                                                             min_area=self.sanitize.min_area)
        keep = np.flatnonzero(valid.numpy())
        mask_array = None
        if masks is not None:
            # Nearest-neighbour maps of the resize, cut to the crop: each mask rendered at the crop's size, then padded.
            rows = _nearest_index(height, nh)
            cols = _nearest_index(width, nw)
            rows = (np.arange(height) if rows is None else rows)[top:top + ch]
            cols = (np.arange(width) if cols is None else cols)[left:left + cw]
            rendered = np.zeros((len(keep), side, side), dtype=np.uint8)
            rendered[:, :ch, :cw] = masks.render(rows, cols, keep)
            mask_array = torch.from_numpy(np.ascontiguousarray(rendered[..., ::-1]) if flip else rendered)
        out = (pixels, boxes, labels[valid], mask_array)
        if keypoints is None:
            return out
        keypoints = _move_keypoints(keypoints, scale=(nw / width, nh / height), shift=(-left, -top))
        return (*out, _finish_keypoints(keypoints[valid], (side, side), flip, flip_index))


def build_lsj_transforms(*, size: int, scale: Sequence[float], flip_prob: float) -> LSJTransforms:
    """Training transforms of ``data.lsj``: large-scale jitter around a ``size`` square, flip."""
    return LSJTransforms(LargeScaleJitter(size=size, scale=scale),
                         v2.RandomHorizontalFlip(flip_prob) if flip_prob > 0 else None,
                         v2.SanitizeBoundingBoxes(min_size=1))


def image_to_chw(image: Image.Image) -> torch.Tensor:
    """An RGB image as a [3, H, W] uint8 tensor, plane by plane (torch's permute-and-copy of an [H, W, 3]
    array takes milliseconds where its threads must first wake up, as in the main process)."""
    return torch.from_numpy(np.stack([np.asarray(band) for band in image.split()]))


@contextlib.contextmanager
def sample_rng(seed: int | None) -> Iterator[None]:
    """The global CPU generator seeded with ``seed`` inside the block, restored after it (None: left as it is):
    the sample's own RNG, so the same (index, seed) gives the same augmentation in any worker."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        # Not torch.manual_seed: it seeds the accelerators too (about a millisecond per sample while CUDA is
        # not initialised, spent recording a traceback), which the transforms never draw from.
        torch.default_generator.manual_seed(seed)
        yield


class CocoDetection(Dataset):
    """A COCO instances dataset: item ``key`` (an index, or ``(index, seed)`` for augmentation) ->
    ``(image [3, H, W] uint8, target)`` with ``boxes`` [N, 4] xyxy float, ``labels`` [N] int64
    (contiguous, 1..K), ``masks`` [N, H, W] uint8, ``image_id`` and ``orig_size`` (H0, W0).

    Crowd annotations are kept out of the targets (as Detectron); evaluation reads them from the
    JSON itself.

    ``task`` (``model.task``): ``masks`` as above; ``boxes`` without ``masks``; ``keypoints`` with
    ``keypoints`` [N, K, 3] float (x, y, visibility 0/1/2) instead of masks, in continuous pixel
    coordinates: COCO's integer pixel indices + 0.5, as detectron2 reads them (``to_coco_results``
    subtracts it again).
    """

    def __init__(self, *, images: str | Path, annotations: str | Path, transforms: v2.Transform | None = None,
                 filter_empty: bool = False, task: str = "masks") -> None:
        if task not in ("masks", "boxes", "keypoints"):
            raise ValueError(f"task {task!r} is not masks, boxes or keypoints")
        self.images = Path(images)
        self.annotations = Path(annotations)
        self.task = task
        records, categories, self.report = load_coco_json(self.annotations, task=task)
        self.keypoint_names: list[str] = []
        self.keypoint_flip_index: list[int] = []
        if task == "keypoints":
            self.keypoint_names = list(categories[0]["keypoints"])
            self.keypoint_flip_index = keypoint_flip_index(self.keypoint_names, where=str(self.annotations))
        cat_ids = sorted(c["id"] for c in categories)
        # Contiguous labels 1..K for the model (0 is background); mapped back when writing results.
        self.cat_id_to_label = {cid: i + 1 for i, cid in enumerate(cat_ids)}
        self.label_to_cat_id = {v: k for k, v in self.cat_id_to_label.items()}
        names = {c["id"]: c["name"] for c in categories}
        self.class_names = [names[cid] for cid in cat_ids]
        if filter_empty:
            kept = [r for r in records if any(not a.get("iscrowd", 0) for a in r.anns)]
            if len(kept) < len(records):
                self.report.skipped["training images without annotations (data.filter_empty)"] += (
                    len(records) - len(kept))
            records = kept
        if not records:
            raise DataError(f"{self.annotations}: no images to use ({self.report.summary()})")
        for r in records:  # a missing file is found now, not hours into training
            if not (self.images / r.file_name).is_file():
                raise DataError(f"{self.images / r.file_name}: image file not found (image id {r.id} in "
                                f"{self.annotations})")
        self.records = records
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_keypoints(self) -> int:
        """K, keypoints per instance (0 unless ``task`` is keypoints)."""
        return len(self.keypoint_names)

    def aspect_ratios(self) -> list[float]:
        """width / height of every image, from the JSON (no image is opened)."""
        return [r.width / r.height for r in self.records]

    def image_ids(self) -> list[int]:
        return [r.id for r in self.records]

    def keep(self, image_ids: Sequence[int]) -> None:
        """Restrict the dataset to these image ids (in the dataset's order)."""
        wanted = set(image_ids)
        self.records = [r for r in self.records if r.id in wanted]

    def image_file(self, rec: ImageRecord) -> tuple[Path, str]:
        """The record's image file, and how an error names the image."""
        return self.images / rec.file_name, f"image id {rec.id} in {self.annotations}"

    def load_image(self, rec: ImageRecord) -> Image.Image:
        """The record's image as 8-bit RGB of the JSON's size (``read_image``)."""
        path, where = self.image_file(rec)
        return read_image(path, expected_size=(rec.width, rec.height), where=where)

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
        """``key``: an index, ``(index, sample_seed)``, or ``(index, sample_seed, size)`` with the shorter side drawn
        for the sample's batch (``TrainSampler(sizes=)``; built-in transforms only)."""
        index, seed, size = (key + (None,))[:3] if isinstance(key, tuple) else (key, None, None)
        if size is not None and not isinstance(self.transforms, DetectionTransforms):
            raise ValueError(f"{self.annotations}: a size drawn per batch needs build_transforms' resize, not "
                             f"{type(self.transforms).__name__}")
        rec = self.records[index]
        pil = self.load_image(rec)
        anns = [a for a in rec.anns if not a.get("iscrowd", 0)]
        h, w = rec.height, rec.width
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes = _clamp(boxes, h, w)
        labels = torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        if self.task != "masks":
            return self._boxes_or_keypoints_item(rec, seed, pil, anns, boxes, labels, size)
        masks = InstanceMasks.from_annotations(anns, h, w, str(self.annotations))
        if isinstance(self.transforms, DetectionTransforms):
            with sample_rng(seed):
                image, boxes, labels, mask_array = self.transforms.apply(pil, boxes, labels, masks, size=size)
        else:
            # Any other transform gets what torchvision's transforms expect: tv_tensors, every mask decoded.
            image = tv_tensors.Image(image_to_chw(pil))
            target = {"boxes": boxes, "labels": labels, "masks": tv_tensors.Mask(torch.from_numpy(masks.render()))}
            if self.transforms is not None:
                with sample_rng(seed):
                    image, target = self.transforms(image, target)
            image = image.as_subclass(torch.Tensor)
            boxes, labels, mask_array = target["boxes"].as_subclass(torch.Tensor), target["labels"], \
                target["masks"].as_subclass(torch.Tensor)
        target = {
            "boxes": boxes,
            "labels": labels,
            "masks": mask_array,
            "image_id": rec.id,
            "orig_size": (h, w),
            "seed": seed,  # the sample's own seed: the model draws its anchor/RoI samples from it too
        }
        return image, target

    def _boxes_or_keypoints_item(self, rec: ImageRecord, seed: int | None, pil: Image.Image, anns: list[dict],
                                 boxes: tv_tensors.BoundingBoxes, labels: torch.Tensor,
                                 size: int | None = None) -> tuple[torch.Tensor, dict]:
        """An item of a boxes or keypoints dataset: no masks decoded."""
        keypoints = None
        if self.task == "keypoints":
            k = self.num_keypoints
            keypoints = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, k, 3)
            # COCO's keypoints are integer pixel indices; +0.5 makes them continuous coordinates like the boxes
            # (detectron2's load_coco_json), so that a flip is x -> W - x for both.
            keypoints[..., :2] += 0.5
            keypoints[keypoints[..., 2] == 0] = 0.0
        if isinstance(self.transforms, DetectionTransforms):
            with sample_rng(seed):
                image, boxes, labels, _, *rest = self.transforms.apply(pil, boxes, labels, None, keypoints,
                                                                       self.keypoint_flip_index, size=size)
            keypoints = rest[0] if rest else None
        elif self.transforms is None:
            image = image_to_chw(pil)
            boxes = boxes.as_subclass(torch.Tensor)
        elif keypoints is None:
            with sample_rng(seed):
                image, target = self.transforms(tv_tensors.Image(image_to_chw(pil)), {"boxes": boxes, "labels": labels})
            image, boxes, labels = image.as_subclass(torch.Tensor), target["boxes"].as_subclass(torch.Tensor), \
                target["labels"]
        else:
            # torchvision's flip mirrors KeyPoints as pixel indices (x -> W - 1 - x) and knows no left/right pairs.
            raise ValueError("keypoint targets are transformed by build_transforms' pipelines only")
        target = {"boxes": boxes, "labels": labels, "image_id": rec.id, "orig_size": (rec.height, rec.width),
                  "seed": seed}
        if keypoints is not None:
            target["keypoints"] = keypoints
        return image, target


def read_image(path: str | Path, *, expected_size: tuple[int, int] | None = None, where: str = "") -> Image.Image:
    """An image file as 8-bit RGB; ``expected_size`` (width, height) is the annotations', ``where`` names it in errors."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            orientation = im.getexif().get(0x0112, 1)
            rgb = _to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found" + (f" ({where})" if where else "")) from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read {where or 'image'}: {e}") from None
    if expected_size is None:
        # A free image (scratchdet predict) is taken as a viewer shows it: a phone stores a portrait
        # photo sideways with an EXIF orientation, and its user expects detections on the upright picture.
        return _apply_orientation(rgb, orientation)
    if _needs_orientation(path, rgb.size, orientation, tuple(expected_size), where):
        rgb = _apply_orientation(rgb, orientation)
    return rgb


def _needs_orientation(path: Path, size: tuple[int, int], orientation: int, expected: tuple[int, int],
                       where: str) -> bool:
    """Whether stored pixels of ``size`` are turned upright to the annotations' ``expected`` size; DataError where
    neither fits."""
    # COCO's width/height (and cocoapi) describe the stored pixels, so EXIF is ignored where they
    # match; where the JSON has the rotated size, the annotations were made on the displayed image.
    if size == expected:
        return False
    if orientation in (5, 6, 7, 8) and size == expected[::-1]:
        return True
    raise DataError(f"{path} is {size[0]}x{size[1]} but {where or 'its annotations'} says "
                    f"{expected[0]}x{expected[1]}")


def check_image(path: str | Path, *, expected_size: tuple[int, int], where: str) -> None:
    """What ``read_image`` checks, from the file's header (cheap: no pixels decoded): the file opens as an
    image, PIL's ``verify`` passes (PNG chunks; a truncated JPEG passes, found only when the loader decodes it)
    and its size fits the annotations'."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # first: verify refuses an image read since it was opened
        orientation = 1
        if size != tuple(expected_size):  # the EXIF orientation matters only where the size differs
            with Image.open(path) as im:
                orientation = im.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found ({where})") from None
    # verify() reports a broken PNG chunk as SyntaxError.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read {where}: {e}") from None
    _needs_orientation(path, size, orientation, tuple(expected_size), where)


def check_images(dataset: Any, indices: Sequence[int] | None = None) -> int:
    """``check_image`` on the images of a CocoDetection or VocDetection (at ``indices``, or all); the number checked."""
    records = dataset.records if indices is None else [dataset.records[i] for i in indices]
    for rec in records:
        path, where = dataset.image_file(rec)
        check_image(path, expected_size=(rec.width, rec.height), where=where)
    return len(records)


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB: grayscale, palette, CMYK and alpha converted (alpha dropped), 16-bit scaled (not clipped)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        return Image.fromarray(arr.clip(0, 255).round().astype(np.uint8)).convert("RGB")
    # convert() of an RGB image is a copy of it: one less full-size copy per training sample.
    return im if im.mode == "RGB" else im.convert("RGB")


def _apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    """Rotate/flip stored pixels as EXIF orientation 2-8 says (PIL's exif_transpose, minus the EXIF)."""
    ops = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180], 4: [Image.Transpose.FLIP_TOP_BOTTOM],
           5: [Image.Transpose.TRANSPOSE], 6: [Image.Transpose.ROTATE_270], 7: [Image.Transpose.TRANSVERSE],
           8: [Image.Transpose.ROTATE_90]}
    for op in ops.get(orientation, []):
        im = im.transpose(op)
    return im


def _clamp(boxes: torch.Tensor, h: int, w: int) -> tv_tensors.BoundingBoxes:
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))


# input_size_report's thresholds: images the training resize shrinks more than 2x on median, and boxes outside
# [smallest anchor / 2, largest anchor * 2], where a box's best anchor (centred squares) overlaps it by IoU 1/4 at
# most, under the RPN's 0.3 for a negative: such boxes are learned only through the low-quality-match rule.
SHRINK_LIMIT = 2.0
ANCHOR_REACH = 2.0
# Anchor coverage, the way YOLOv5's AutoAnchor checks its anchors (the share of boxes some anchor can match),
# in the RPN's own terms: a box is covered when some anchor of the set, centred on it, overlaps it by IoU >= 0.5.
# With anchors an octave apart that is what a box half-way between two sizes gets (a square of side a*sqrt(2)
# against a and 2a: IoU 1/2 each), so every box inside the anchors' span and aspect ratios is covered; one under
# it has no anchor of its shape and learns only through the low-quality-match rule (one anchor, IoU < 0.5, far
# under the RPN's 0.7 for a positive).  A warning under 80% covered: below what the paper's own setting gets
# on real photos (its anchors 32-512 px at 800 px cover 82.8% of tiny_coco's 465 COCO training boxes, most of
# the rest elongated past 1:3), so a warning means a set the anchors fit worse than they fit COCO.
COVERAGE_IOU = 0.5
COVERAGE_MIN = 0.8
# The smallest object a stride-4 P2 map still resolves: an 8 px box spans 2 feature cells; smaller ones vanish
# from the features whatever the anchors, and only a larger input brings them back.
TINY_BOX = 8.0


def anchor_coverage(wh: np.ndarray, anchor_sizes: Sequence[float],
                    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> np.ndarray:
    """For each box (width, height) at the input size, the best IoU of an anchor of the set centred on it
    (shape only: stride offsets ignored), with torchvision's anchor shapes (h/w = ratio, area = size^2)."""
    wh = np.asarray(wh, dtype=np.float64).reshape(-1, 2)
    sizes = np.asarray(anchor_sizes, dtype=np.float64)[:, None]
    h_ratio = np.sqrt(np.asarray(aspect_ratios, dtype=np.float64))[None, :]
    aw, ah = (sizes / h_ratio).ravel(), (sizes * h_ratio).ravel()  # [A]
    w, h = wh[:, :1], wh[:, 1:]
    inter = np.minimum(w, aw) * np.minimum(h, ah)
    iou = inter / (w * h + aw * ah - inter)
    return iou.max(1) if len(wh) else np.zeros(0)


def box_dims(records: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Every non-crowd box of the records as (width, height) [N, 2] in the image's own pixels, and the index of
    its record [N] (from the annotations alone: no image opened)."""
    dims: list[tuple[float, float]] = []
    owner: list[int] = []
    for i, r in enumerate(records):
        if isinstance(r, ImageRecord):
            d = [(a["bbox"][2], a["bbox"][3]) for a in r.anns if not a.get("iscrowd", 0)]
        else:  # a VocRecord: corners in 1-based inclusive pixels
            b = r.boxes
            d = list(zip((b[:, 2] - b[:, 0] + 1).tolist(), (b[:, 3] - b[:, 1] + 1).tolist()))
        dims += d
        owner += [i] * len(d)
    return np.asarray(dims, dtype=np.float64).reshape(-1, 2), np.asarray(owner, dtype=np.int64)


def input_size_report(dataset: Any, *, min_sizes: Sequence[int], max_size: int, anchor_sizes: Sequence[int],
                      lsj_size: int = 0, lsj_scale: Sequence[float] = (0.1, 2.0),
                      aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> tuple[str, list[str]]:
    """The training images and boxes at the training input size, from the annotations alone (no image opened):
    a summary line with the anchors' box coverage (``anchor_coverage``), and warnings where the resize shrinks
    the images more than 2x on median, where more than half the boxes lie outside the anchors' reach (under
    half the smallest anchor or over twice the largest) or under the smallest anchor, where more than half
    shrink under 8 px, or where fewer than 80% of the boxes are covered."""
    recs = dataset.records
    wh = np.array([(r.width, r.height) for r in recs], dtype=np.float64).reshape(-1, 2)
    if not len(wh):
        return "", []
    short, long = wh.min(1), wh.max(1)
    if lsj_size:
        # LargeScaleJitter at its mean factor: the image fitted into a square of lsj_size * s.
        scale = lsj_size * (lsj_scale[0] + lsj_scale[-1]) / 2 / long
        keys = "data.lsj_size / data.lsj_scale"
    else:
        mid = sorted(min_sizes)[len(min_sizes) // 2]  # the middle size of a multi-scale draw
        scale = np.minimum(mid / short, max_size / long)
        keys = "data.min_size_train / data.max_size_train (and data.min_size_test / data.max_size_test)"
    dims, owner = box_dims(recs)
    wh = dims * scale[owner][:, None]
    boxes = np.sqrt(wh[:, 0] * wh[:, 1])
    s, ln, k = float(np.median(short)), float(np.median(long)), float(np.median(scale))
    lo, hi = min(anchor_sizes), max(anchor_sizes)
    sides_text = f"shorter side {s:.0f} px, longer {ln:.0f} (medians) to about {s * k:.0f} and {ln * k:.0f}"
    summary = f"training set at the input size: images resized x{k:.2f} on median, {sides_text}"
    covered = float(np.mean(anchor_coverage(wh, anchor_sizes, aspect_ratios) >= COVERAGE_IOU)) if len(boxes) else 1.0
    if len(boxes):
        p10, med, p90 = np.percentile(boxes, [10, 50, 90])
        summary += (f"; {len(boxes)} boxes, sqrt(area) then median {med:.0f} px (10-90%: {p10:.0f}-{p90:.0f}), "
                    f"anchors {lo}-{hi} px cover {covered:.1%} of them (an anchor of their shape at IoU >= "
                    f"{COVERAGE_IOU:g})")
    warnings = []
    if k < 1 / SHRINK_LIMIT:
        warnings.append(
            f"training images are shrunk {1 / k:.1f}x on median by the training resize, {sides_text}, and their "
            f"objects with them; to train nearer the images' own size raise {keys}, with model.anchor_sizes to match "
            "(data.fit=true sizes both from the boxes)")
    if len(boxes):
        below, above = float(np.mean(boxes < lo / ANCHOR_REACH)), float(np.mean(boxes > hi * ANCHOR_REACH))
        under = float(np.mean(boxes < lo))
        # Anchors an octave apart from the power of 2 nearest the boxes' 10th percentile, as a suggestion.
        start = 2 ** max(2, round(math.log2(max(float(np.percentile(boxes, 10)), 1.0))))
        if below + above > 0.5:
            warnings.append(
                f"the boxes fall outside the anchors' reach: at the training input size {below:.0%} of the "
                f"{len(boxes)} training boxes are under {lo / ANCHOR_REACH:g} px (half the smallest anchor) and "
                f"{above:.0%} over {hi * ANCHOR_REACH:g} px (twice the largest), sqrt of box area (median "
                f"{np.median(boxes):.0f} px); their best anchor overlaps them by IoU 1/4 at most. Set "
                f"model.anchor_sizes (now {list(anchor_sizes)}) to span the boxes, e.g. "
                f"{[start * 2 ** i for i in range(len(anchor_sizes))]}, or change the input size ({keys})")
        elif under > 0.5:
            warnings.append(
                f"most boxes are smaller than the smallest anchor: {under:.0%} of the {len(boxes)} "
                f"training boxes are under {lo} px at the training input size (sqrt of box area, median "
                f"{np.median(boxes):.0f} px). Set model.anchor_sizes (now {list(anchor_sizes)}) to start nearer "
                f"them, e.g. {[start * 2 ** i for i in range(len(anchor_sizes))]}, or enlarge the input ({keys})")
        tiny = float(np.mean(boxes < TINY_BOX))
        if tiny > 0.5:
            warnings.append(
                f"{tiny:.0%} of the {len(boxes)} training boxes shrink under {TINY_BOX:g} px at the training input "
                f"size (sqrt of box area, median {np.median(boxes):.0f} px): under 2 cells of the finest (stride-4) "
                f"feature map, which no anchor setting brings back; enlarge the input ({keys})")
        if covered < COVERAGE_MIN:
            warnings.append(
                f"the anchors cover {covered:.0%} of the training boxes (an anchor of their size and shape at IoU >= "
                f"{COVERAGE_IOU:g}; under {COVERAGE_MIN:.0%}, less than the paper's anchors cover of COCO's boxes, "
                "leaves many objects to the low-quality-match rule): "
                f"set model.anchor_sizes (now {list(anchor_sizes)}) and model.anchor_aspect_ratios (now "
                f"{list(aspect_ratios)}) to span the boxes, or change the input size ({keys})")
    return summary, warnings


def draw_subset(image_ids: Sequence[int], size: float, seed: int) -> list[int]:
    """A random subset of ``size`` images (a count, or a fraction when below 1), sorted.

    One permutation of the sorted ids per seed, cut at ``size``: for the same seed and base set a
    smaller subset is always inside a larger one (the paper's 1k in 3.5k in 10k in 35k).
    """
    ids = sorted(image_ids)
    count = round(size * len(ids)) if 0 < size < 1 else int(size)
    if count < 1 or count > len(ids):
        raise DataError(f"data.subset={size:g}: asks for {count} of {len(ids)} training images")
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:count])


class TrainSampler:
    """Infinite, deterministic, shardable and resumable stream of training batches.

    Each epoch is a permutation drawn from ``(seed, epoch)``; images are grouped by orientation
    (landscape/portrait) into global batches of ``batch_size``; rank ``r`` of ``world_size``
    takes its contiguous slice of each global batch.  Batch ``i`` of the stream is a pure function
    of ``(seed, i)``, so resuming at iteration ``i`` is ``TrainSampler(..., start=i)``.
    Items are ``(index, sample_seed)``; with ``sizes``, ``(index, sample_seed, size)``: one shorter side drawn per
    global batch (every rank's slice at the same size), so that no image is padded up to a larger one of its batch.
    """

    def __init__(self, aspect_ratios: Sequence[float], *, batch_size: int, seed: int, start: int = 0,
                 rank: int = 0, world_size: int = 1, group_by_aspect: bool = True, sizes: Sequence[int] = ()) -> None:
        if batch_size % world_size:
            raise ValueError(f"solver.ims_per_batch={batch_size} does not divide among {world_size} processes")
        self.sizes = [int(s) for s in sizes]
        self.groups = [int(a >= 1.0) if group_by_aspect else 0 for a in aspect_ratios]
        self.batch_size, self.seed, self.start = batch_size, seed, start
        self.rank, self.world_size = rank, world_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of one epoch (indices only)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
        buckets: dict[int, list[int]] = {0: [], 1: []}
        batches = []
        for i in order.tolist():
            bucket = buckets[self.groups[i]]
            bucket.append(i)
            if len(bucket) == self.batch_size:
                batches.append(bucket.copy())
                bucket.clear()
        # Leftovers of both orientations fill mixed batches; an incomplete last one is dropped,
        # unless the epoch had no batch at all (a dataset smaller than a batch).
        rest = sorted(buckets[0] + buckets[1], key=order.tolist().index)
        for k in range(0, len(rest) - self.batch_size + 1, self.batch_size):
            batches.append(rest[k:k + self.batch_size])
        if not batches:
            batches.append((rest * self.batch_size)[: self.batch_size])
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = self.batch_size // self.world_size
        position, epoch = 0, 0
        while True:
            batches = self.epoch_batches(epoch)
            if position + len(batches) <= self.start:
                position += len(batches)
                epoch += 1
                continue
            for j, batch in enumerate(batches):
                if position >= self.start:
                    mine = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
                    offset = self.rank * per_rank
                    seeds = np.random.SeedSequence([self.seed, epoch, j]).generate_state(len(batch))
                    items = [(i, int(seeds[offset + k])) for k, i in enumerate(mine)]
                    if self.sizes:
                        # Its own stream (the trailing 1), not correlated with the sample seeds above.
                        size = self.sizes[int(np.random.default_rng([self.seed, epoch, j, 1]).integers(len(self.sizes)))]
                        items = [(i, s, size) for i, s in items]
                    yield items
                position += 1
            epoch += 1


def batch_sizes(data: Any) -> list[int]:
    """``TrainSampler``'s ``sizes`` for a ``DataConfig``: its training sizes where one is drawn per batch, else none
    (drawn per image by the resize, or only one)."""
    return list(data.min_size_train) if data.multiscale == "batch" and len(data.min_size_train) > 1 else []


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = zip(*batch)
    return list(images), list(targets)


def worker_init(_: int) -> None:
    # One thread per worker: workers run beside the main process, which needs the cores.
    torch.set_num_threads(1)
    # A preemption's SIGTERM (or Ctrl-C's SIGINT) reaches the whole process group; only the main
    # process acts on it (checkpoint, exit), and it shuts the workers down itself.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_loader(dataset: CocoDetection, sampler: TrainSampler, *, num_workers: int, seed: int,
                 pin_memory: bool = False) -> DataLoader:
    # The loader's own generator: creating its iterator must not draw from the global torch RNG,
    # or a resumed run (which creates it at another point of that stream) would diverge.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      worker_init_fn=worker_init, persistent_workers=False, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))


def test_loader(dataset: CocoDetection, *, batch_size: int = 1, num_workers: int = 0, max_images: int = 0,
                rank: int = 0, world_size: int = 1) -> DataLoader:
    """Inference over the first ``max_images`` (0: all) images; rank ``r`` of ``world_size`` takes
    every ``world_size``-th of them, so the shards cover the set once (distributed evaluation)."""
    indices = list(range(len(dataset) if not max_images else min(max_images, len(dataset))))[rank::world_size]
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=collate, worker_init_fn=worker_init)


def pixel_stats(dataset: CocoDetection, max_images: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel RGB mean and std (0-255) over a dataset's images, for model.pixel_mean/std."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    records = dataset.records[:max_images] if max_images else dataset.records
    for rec in records:
        px = np.asarray(dataset.load_image(rec), dtype=np.float64).reshape(-1, 3)
        total += px.sum(0)
        total_sq += (px**2).sum(0)
        count += len(px)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0))
    return [round(float(v), 3) for v in mean], [round(float(v), 3) for v in std]


def resolve_datasets(data_cfg: Any) -> tuple[tuple[str, str], tuple[str, str] | None]:
    """``((train images, train json), (val images, val json) or None)`` from ``cfg.data``.

    With no training annotations given, the embedded synthetic dataset is generated (once,
    cached) and used for both splits.
    """
    if data_cfg.train.annotations:
        val = (data_cfg.val.images, data_cfg.val.annotations) if data_cfg.val.annotations else None
        return (data_cfg.train.images, data_cfg.train.annotations), val
    from . import synth

    s = data_cfg.synth
    root = synth.ensure(seed=s.seed, num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, root=s.root,
                        keypoints=s.keypoints)
    kind = "keypoints" if s.keypoints else "instances"
    return ((str(root / "train"), str(root / "annotations" / f"{kind}_train.json")),
            (str(root / "val"), str(root / "annotations" / f"{kind}_val.json")))
