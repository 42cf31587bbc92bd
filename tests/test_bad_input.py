"""The bad-input catalogue (docs/bad_input.md): one test per row, plus a fuzz test of the loader."""

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import faster_coco_eval.core.mask as mask_utils
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from scratchdet.data import CocoDetection, DataError, build_transforms, check_categories, read_image

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"


def _base():
    images = [{"id": 1, "file_name": "a.png", "height": 32, "width": 40},
              {"id": 2, "file_name": "b.png", "height": 32, "width": 40}]
    square = [4, 4, 20, 4, 20, 20, 4, 20]
    anns = [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [4, 4, 16, 16], "segmentation": [square],
             "area": 256, "iscrowd": 0},
            {"id": 11, "image_id": 2, "category_id": 7, "bbox": [4, 4, 16, 16], "segmentation": [square],
             "area": 256, "iscrowd": 0}]
    return {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}


def _write(tmp_path, data, image_writer=None):
    (tmp_path / "img").mkdir(exist_ok=True)
    for im in data.get("images", []) if isinstance(data, dict) else []:
        if isinstance(im, dict) and isinstance(im.get("file_name"), str):
            Image.new("RGB", (40, 32), (120, 30, 200)).save(tmp_path / "img" / im["file_name"])
    if image_writer:
        image_writer(tmp_path / "img")
    f = tmp_path / "ann.json"
    f.write_text(data if isinstance(data, str) else json.dumps(data))
    return f


def _dataset(tmp_path, data, image_writer=None, **kw):
    f = _write(tmp_path, data, image_writer)
    return CocoDetection(images=tmp_path / "img", annotations=f, **kw)


def mutate(fn):
    def build():
        d = _base()
        fn(d)
        return d
    return build


def _square_rle_counts() -> list[int]:
    """Uncompressed RLE counts (column-major) of _base's 16x16 square at (4, 4) in a 40x32 image."""
    counts = [4 * 32 + 4] + [16, 16] * 15 + [16]
    return counts + [32 * 40 - sum(counts)]


def _rle(change):
    """A build whose first annotation's segmentation is the square's RLE with its counts changed."""
    return mutate(lambda d: d["annotations"][0].update(segmentation={"size": [32, 40],
                                                                    "counts": change(_square_rle_counts())}))


# (id, what, how to build the JSON, image writer, outcome, detail)
#   outcome "error": DataError at load, message matching detail (and the file name)
#   outcome "read": DataError when the image is read, matching detail
#   outcome "skip": loads; report counts detail once; annotation count after
#   outcome "clean": loads with nothing counted, every bbox as in the JSON; detail: annotation count
#   outcome "categories": check_categories against _base's label map raises matching detail (None: passes)
#   outcome "free image": read_image with no expected size (as predict) gives first pixel detail, or
#   raises DataError matching detail
CASES = [
    ("B01", "annotation file missing", None, None, "error", "not found"),
    ("B02", "annotation file is not JSON", lambda: "{not json", None, "error", "not valid JSON"),
    ("B03", "top level is not an object", lambda: [], None, "error", "expected a JSON object"),
    ("B04", "'images' missing", mutate(lambda d: d.pop("images")), None, "error", "'images'"),
    ("B05", "'categories' missing", mutate(lambda d: d.pop("categories")), None, "error", "'categories'"),
    ("B06", "category without an integer id", mutate(lambda d: d["categories"].append({"name": "x"})), None,
     "error", "integer 'id'"),
    ("B07", "duplicate category id", mutate(lambda d: d["categories"].append({"id": 3, "name": "c"})), None,
     "error", "duplicate category id 3"),
    ("B08", "image without file_name", mutate(lambda d: d["images"][1].pop("file_name")), None, "error",
     "image id 2.*'file_name'"),
    ("B09", "image height is a string", mutate(lambda d: d["images"][0].update(height="32")), None, "error",
     "image id 1.*'height'"),
    ("B10", "image height 0", mutate(lambda d: d["images"][0].update(height=0)), None, "error",
     "image id 1.*positive"),
    ("B11", "duplicate image id", mutate(lambda d: d["images"].append(dict(d["images"][0]))), None, "error",
     "duplicate image id 1"),
    ("B12", "duplicate annotation id", mutate(lambda d: d["annotations"][1].update(id=10)), None, "error",
     "duplicate annotation id 10"),
    ("B13", "annotation without id", mutate(lambda d: d["annotations"][0].pop("id")), None, "error",
     "missing or mistyped 'id'"),
    ("B14", "annotation refers to an unknown image id", mutate(lambda d: d["annotations"][0].update(image_id=99)),
     None, "error", "annotation id 10 refers to unknown image id 99"),
    ("B15", "unknown category id", mutate(lambda d: d["annotations"][0].update(category_id=5)), None, "error",
     "annotation id 10 .*unknown category id 5"),
    ("B16", "bbox missing", mutate(lambda d: d["annotations"][0].pop("bbox")), None, "error",
     "annotation id 10 .*'bbox'"),
    ("B17", "bbox of 3 numbers", mutate(lambda d: d["annotations"][0].update(bbox=[1, 2, 3])), None, "error",
     "annotation id 10 .*'bbox'"),
    ("B18", "bbox of strings", mutate(lambda d: d["annotations"][0].update(bbox=["1", "2", "3", "4"])), None,
     "error", "annotation id 10 .*'bbox'"),
    ("B19", "iscrowd neither 0 nor 1", mutate(lambda d: d["annotations"][0].update(iscrowd="yes")), None, "error",
     "annotation id 10 .*'iscrowd'"),
    ("B20", "bbox with NaN", mutate(lambda d: d["annotations"][0].update(bbox=[math.nan, 4, 16, 16])), None,
     "skip", ("non-finite bbox", 1)),
    ("B21", "bbox with Inf", mutate(lambda d: d["annotations"][0].update(bbox=[4, 4, math.inf, 16])), None,
     "skip", ("non-finite bbox", 1)),
    ("B22", "bbox of zero width", mutate(lambda d: d["annotations"][0].update(bbox=[4, 4, 0, 16])), None, "skip",
     ("empty bbox", 1)),
    ("B23", "bbox of negative height", mutate(lambda d: d["annotations"][0].update(bbox=[4, 4, 16, -3])), None,
     "skip", ("empty bbox", 1)),
    ("B24", "bbox entirely outside the image", mutate(lambda d: d["annotations"][0].update(bbox=[50, 40, 5, 5])),
     None, "skip", ("outside the image", 1)),
    ("B25", "bbox partly outside the image (clipped)",
     mutate(lambda d: d["annotations"][0].update(bbox=[-4, 4, 60, 16])), None, "skip", ("clipped", 2)),
    ("B26", "only polygon has fewer than 3 points",
     mutate(lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 5]])), None, "skip", ("3 or more", 1)),
    ("B27", "one of two polygons has fewer than 3 points (dropped)",
     mutate(lambda d: d["annotations"][0]["segmentation"].append([1, 1, 5, 5])), None, "skip", ("dropped", 2)),
    ("B28", "polygon with an odd number of coordinates",
     mutate(lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 5, 9, 9, 3]])), None, "skip",
     ("3 or more", 1)),
    ("B29", "RLE whose size disagrees with the image",
     mutate(lambda d: d["annotations"][0].update(segmentation={"size": [10, 10], "counts": [0, 100]})), None,
     "skip", ("RLE size", 1)),
    ("B30", "segmentation missing", mutate(lambda d: d["annotations"][0].pop("segmentation")), None, "skip",
     ("usable segmentation", 1)),
    ("B31", "image file missing", mutate(lambda d: d["images"][1].update(file_name="nope.png")),
     lambda d: (d / "nope.png").unlink(), "error",
     "nope.png: image file not found \\(image id 2"),
    ("B32", "image file truncated", None, lambda d: (d / "a.png").write_bytes((d / "a.png").read_bytes()[:60]),
     "read", "a.png: cannot read image id 1"),
    ("B33", "image file corrupt (not an image)", None, lambda d: (d / "a.png").write_bytes(b"\x00garbage" * 50),
     "read", "a.png: cannot read image id 1"),
    ("B34", "image size disagrees with the JSON", None,
     lambda d: Image.new("RGB", (41, 32)).save(d / "a.png"), "read", "a.png is 41x32 but image id 1 in .*ann.json says 40x32"),
    ("B35", "no images at all", mutate(lambda d: (d["images"].clear(), d["annotations"].clear())), None, "error",
     "no images to use"),
    ("B36", "no annotations at all, for training", mutate(lambda d: d.pop("annotations")), None, "error",
     "no images to use .*without annotations"),
    ("B37", "grayscale image", None, lambda d: Image.new("L", (40, 32), 77).save(d / "a.png"), "image", (77, 77, 77)),
    ("B38", "CMYK image", None, lambda d: Image.new("CMYK", (40, 32), (0, 255, 255, 0)).save(d / "a.jpg") or
     (d / "a.jpg").rename(d / "a.png"), "image", (255, 0, 0)),
    ("B39", "16-bit grayscale image", None,
     lambda d: Image.fromarray(np.full((32, 40), 65535 // 2, np.uint16)).save(d / "a.png"), "image", (127, 127, 127)),
    ("B40", "image with alpha", None, lambda d: Image.new("RGBA", (40, 32), (10, 20, 30, 0)).save(d / "a.png"),
     "image", (10, 20, 30)),
    ("B41", "palette image", None, lambda d: Image.new("RGB", (40, 32), (255, 0, 0)).convert("P").save(d / "a.png"),
     "image", (255, 0, 0)),
    ("B42", "EXIF rotation, JSON size = stored pixels (COCO's convention): not rotated", None,
     lambda d: _exif_image(d / "a.png", (40, 32)), "image", (255, 255, 255)),
    ("B43", "EXIF rotation, JSON size = rotated image: rotated", mutate(
        lambda d: d["images"][0].update(height=40, width=32)), lambda d: _exif_image(d / "a.png", (40, 32)),
     "image", (0, 0, 0)),
    ("B44", "bbox inside the image whose x + w is inexact in floating point (1.1 + 7.45 - 1.1 != 7.45)",
     mutate(lambda d: d["annotations"][0].update(bbox=[1.1, 4, 7.45, 16])), None, "clean", 2),
    ("B45", "RLE counts summing to more than height x width", _rle(lambda c: c[:-1] + [c[-1] + 1]), None, "skip",
     ("RLE counts", 1)),
    ("B46", "RLE counts summing to less than height x width", _rle(lambda c: c[:-1]), None, "skip", ("RLE counts", 1)),
    ("B47", "RLE with a negative count", _rle(lambda c: [c[0] + 5, -5] + c[1:]), None, "skip", ("RLE counts", 1)),
    ("B48", "RLE with a fractional count", _rle(lambda c: [c[0] - 0.5, c[1] + 0.5] + c[2:]), None, "skip",
     ("RLE counts", 1)),
    ("B49", "compressed RLE with characters outside COCO's alphabet", _rle(lambda c: "zzzz"), None, "skip",
     ("RLE counts", 1)),
    ("B50", "compressed RLE summing to less than height x width", _rle(lambda c: "35"), None, "skip",
     ("RLE counts", 1)),
    ("B51", "RLE whose size is not a list", mutate(lambda d: d["annotations"][0].update(
        segmentation={"size": 1280, "counts": [1280]})), None, "skip", ("RLE size", 1)),
    ("B52", "only polygon has a point far outside the image (1e9)",
     mutate(lambda d: d["annotations"][0].update(segmentation=[[4, 4, 1e9, 4, 20, 20]])), None, "skip",
     ("far outside", 1)),
    ("B53", "one of two polygons has a point far outside the image (dropped)",
     mutate(lambda d: d["annotations"][0]["segmentation"].append([4, 4, -1e9, 4, 20, 20])), None, "skip",
     ("far outside", 2)),
    ("B54", "bbox with a number beyond float range (10**400)",
     mutate(lambda d: d["annotations"][0].update(bbox=[4, 4, 10**400, 16])), None, "skip", ("non-finite bbox", 1)),
    ("B55", "polygon with a number beyond float range (10**400)",
     mutate(lambda d: d["annotations"][0].update(segmentation=[[4, 4, 10**400, 4, 20, 20]])), None, "skip",
     ("3 or more", 1)),
    ("B56", "validation categories differ from the training set's (ids 3 and 5 vs 3 and 7)",
     mutate(lambda d: d.update(categories=[{"id": 3, "name": "a"}, {"id": 5, "name": "b"}])), None, "categories",
     "ann.json: validation set.*only in the training set: \\[7\\].*only in .*: \\[5\\]"),
    ("B57", "validation categories in another order, with other names", mutate(lambda d: d.update(
        categories=[{"id": 7, "name": "y"}, {"id": 3, "name": "x"}])), None, "categories", None),
    ("B58", "image given to `scratchdet predict` with EXIF rotation: rotated (what a viewer shows)", None,
     lambda d: _exif_image(d / "a.png", (40, 32)), "free image", (0, 0, 0)),
    ("B59", "image given to `scratchdet predict` unreadable", None,
     lambda d: (d / "a.png").write_bytes(b"\x00garbage" * 50), "free image", "a.png: cannot read image"),
]


def _exif_image(path, size):
    """A JPEG saved as a.png whose top-left pixel is white, with EXIF orientation 6 (rotate 90 cw)."""
    im = Image.new("RGB", size, (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path.with_suffix(".jpg"), exif=exif, quality=100)
    path.with_suffix(".jpg").rename(path)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_catalogue_row(case, tmp_path):
    cid, what, build, writer, outcome, detail = case
    data = build() if build else _base()
    if cid == "B01":
        with pytest.raises(DataError, match=detail):
            CocoDetection(images=tmp_path, annotations=tmp_path / "missing.json")
        return
    if outcome == "error":
        with pytest.raises(DataError, match=detail) as e:
            _dataset(tmp_path, data, writer, filter_empty=cid == "B36")
        assert "ann.json" in str(e.value) or "img" in str(e.value)
    elif outcome == "read":
        ds = _dataset(tmp_path, data, writer)
        with pytest.raises(DataError, match=detail):
            ds[0]
    elif outcome == "skip":
        ds = _dataset(tmp_path, data, writer)
        reason, kept = detail
        counted = {r: n for r, n in ds.report.skipped.items() if reason in r}
        assert sum(counted.values()) == 1, ds.report.skipped
        assert sum(len(r.anns) for r in ds.records) == kept
        for i in range(len(ds)):  # what is kept trains
            _, target = ds[i]
            assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])
    elif outcome == "image":
        ds = _dataset(tmp_path, data, writer)
        image, _ = ds[0]
        assert image.shape[0] == 3
        assert tuple(int(v) for v in image[:, 0, 0]) == pytest.approx(detail, abs=3)
    elif outcome == "clean":
        ds = _dataset(tmp_path, data, writer)
        assert not ds.report.skipped, ds.report.skipped
        assert [a["bbox"] for r in ds.records for a in r.anns] == [a["bbox"] for a in data["annotations"]]
        assert sum(len(r.anns) for r in ds.records) == detail
    elif outcome == "categories":
        f = _write(tmp_path, data, writer)
        base_map = {1: 3, 2: 7}  # _base's categories as CocoDetection maps them
        if detail is None:
            check_categories(base_map, f)
        else:
            with pytest.raises(DataError, match=detail):
                check_categories(base_map, f)
    elif outcome == "free image":
        _write(tmp_path, data, writer)
        if isinstance(detail, str):
            with pytest.raises(DataError, match=detail):
                read_image(tmp_path / "img" / "a.png")
        else:
            image = read_image(tmp_path / "img" / "a.png")
            assert image.mode == "RGB"
            assert image.getpixel((0, 0)) == pytest.approx(detail, abs=3)


def test_catalogue_document_lists_every_row():
    text = DOC.read_text()
    rows = re.findall(r"^\| (B\d\d) \|", text, flags=re.M)
    assert rows == [c[0] for c in CASES]
    assert len(rows) >= 30


# ---- fuzz: whatever the JSON, the loader loads or raises DataError, and what loads decodes --------------
#
# Most examples are structurally valid files whose geometry varies (boxes, polygons, RLE); about one
# in eight also gets a structural mutation. Every file that loads is decoded sample by sample
# through CocoDetection.__getitem__ with the training transforms, checking the targets' invariants.

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=True),
                         st.text(max_size=4))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=5),
                                                             st.dictionaries(st.text(max_size=6), c, max_size=4)),
                           max_leaves=12)
# Values no image coordinate should have: non-finite, huge (1e9 px makes the polygon rasteriser
# allocate gigabytes), beyond float range (JSON allows 10**400), tiny, negative zero.
SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 1e9, -1e9, 10**400, -(10**400),
                           5e-324, -0.0, 0.0])


def _coordinate(extent: int, wild: bool = True) -> st.SearchStrategy:
    """A coordinate for an image side of ``extent`` px: inside or near it, or (``wild``) sometimes anything."""
    near = st.one_of(st.floats(-extent / 4, 1.25 * extent), st.integers(-extent, 2 * extent))
    return st.one_of(near, near, near, SPECIAL) if wild else near


@st.composite
def fuzz_bbox(draw, h: int, w: int) -> list:
    kind = draw(st.integers(0, 7))
    if kind < 6:  # a plausible box: corner near the image, size up to 1.5 image; or (kind 5) about empty
        x, y = draw(st.floats(-w / 2, w)), draw(st.floats(-h / 2, h))
        low, high = (-1, 1) if kind == 5 else (1, 1.5)
        return [x, y, draw(st.floats(low, high * w)), draw(st.floats(low, high * h))]
    return [draw(_coordinate(w)), draw(_coordinate(h)), draw(_coordinate(w)), draw(_coordinate(h))]


@st.composite
def fuzz_polygon(draw, h: int, w: int) -> list:
    # 6-20 coordinates mostly; sometimes too few or an odd number.
    n = 2 * draw(st.integers(3, 10)) if draw(st.integers(0, 4)) else draw(st.sampled_from([0, 2, 4, 7, 9, 13, 19]))
    kind = draw(st.integers(0, 9))
    if kind == 0:  # degenerate: one point repeated
        x, y = draw(_coordinate(w)), draw(_coordinate(h))
        return [x, y] * (n // 2) + [x] * (n % 2)
    if kind == 1:  # degenerate: collinear points
        return [v for k in range(n // 2) for v in (k, 2 * k)] + [0] * (n % 2)
    wild = kind < 4  # any coordinate may be non-finite, huge or beyond float range
    return [draw(_coordinate(w if k % 2 == 0 else h, wild)) for k in range(n)]


def _counts_of(cuts: list[int], total: int) -> list[int]:
    """Run lengths between sorted cut points in 0..total: counts that sum to ``total``."""
    points = [0, *sorted(cuts), total]
    return [b - a for a, b in zip(points, points[1:])]


@st.composite
def fuzz_rle(draw, h: int, w: int) -> dict:
    counts: Any = _counts_of(draw(st.lists(st.integers(0, h * w), max_size=6)), h * w)
    change = draw(st.sampled_from(["none"] * 7 + ["more", "less", "negative", "fraction", "bool", "text"]))
    if change == "more":
        counts[-1] += draw(st.integers(1, 3))
    elif change == "less" and counts:
        counts[-1] -= draw(st.integers(1, 3))
    elif change == "negative":
        counts = [*counts, -1, 1]
    elif change == "fraction":
        counts = [counts[0] + 0.5, *counts[1:]]
    elif change == "bool":
        counts = [False, *counts]
    elif change == "text":
        counts = [str(c) for c in counts]
    if draw(st.booleans()) and change in ("none", "more", "less"):  # COCO's compressed string
        try:
            counts = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"].decode()
        except (ValueError, RuntimeError):  # counts that exceed h*w or are negative cannot be encoded
            counts = draw(st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=125), max_size=12))
        if counts and draw(st.integers(0, 2)) == 0:
            k = draw(st.integers(0, len(counts) - 1))
            counts = counts[:k] + draw(st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=125),
                                               max_size=2)) + counts[k + 1:]
    size = [h, w] if draw(st.integers(0, 3)) else draw(st.sampled_from([[w, h], [h, w + 1], [h], "hw", h * w, None,
                                                                         [h, w, 1]]))
    return {"size": size, "counts": counts}


def fuzz_segmentation(h: int, w: int) -> st.SearchStrategy:
    polygons = st.lists(fuzz_polygon(h, w), min_size=1, max_size=3)
    junk = st.sampled_from([None, [], {}, "polygon", {"counts": [h * w]}, [[]], [None]])
    return st.one_of(polygons, polygons, polygons, fuzz_rle(h, w), fuzz_rle(h, w), junk)


@st.composite
def fuzz_coco(draw) -> tuple[dict, bool]:
    """A COCO file (mostly structurally valid, with varied geometry) and whether it was mutated."""
    images = [{"id": k, "file_name": f"{k}.png", "height": draw(st.integers(1, 40)), "width": draw(st.integers(1, 40))}
              for k in range(1, draw(st.integers(1, 3)) + 1)]
    cat_ids = draw(st.lists(st.integers(1, 90), min_size=1, max_size=4, unique=True))
    anns = []
    for k in range(1, draw(st.integers(1, 6)) + 1):
        im = draw(st.sampled_from(images))
        h, w = im["height"], im["width"]
        anns.append({"id": k, "image_id": im["id"], "category_id": draw(st.sampled_from(cat_ids)),
                     "bbox": draw(fuzz_bbox(h, w)), "segmentation": draw(fuzz_segmentation(h, w)),
                     "iscrowd": draw(st.sampled_from([0, 0, 0, 0, 1])), "area": 1.0})
    data = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids]}
    mutated = draw(st.integers(0, 7)) == 0
    if mutated:
        _mutate_structure(draw, data)
    return data, mutated


def _mutate_structure(draw, data: dict) -> None:
    """Add, drop or replace entries and keys of the file's sections with arbitrary JSON."""
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["images", "annotations", "categories"]))
        entries = data[section]
        if not entries or draw(st.booleans()):
            entries.append(draw(json_values))
            continue
        entry = entries[draw(st.integers(0, len(entries) - 1))]
        if not isinstance(entry, dict):
            continue
        key = draw(st.sampled_from(sorted(entry) + ["extra"]))
        if draw(st.booleans()):
            entry.pop(key, None)
        else:
            entry[key] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.sampled_from(["images", "annotations", "categories"]))] = draw(json_values)


def _write_fuzz_images(folder: Path, data: dict) -> None:
    for im in data["images"] if isinstance(data.get("images"), list) else []:
        if (isinstance(im, dict) and isinstance(im.get("file_name"), str) and re.fullmatch(r"\d+\.png", im["file_name"])
                and all(type(im.get(k)) is int and 1 <= im[k] <= 64 for k in ("height", "width"))):
            Image.new("RGB", (im["width"], im["height"]), (90, 140, 20)).save(folder / im["file_name"])


def _check_sample(image: torch.Tensor, target: dict, num_classes: int) -> None:
    """The invariants of a training sample that the model relies on."""
    h, w = image.shape[-2:]
    boxes, masks, labels = target["boxes"], target["masks"], target["labels"]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert boxes.shape == (len(labels), 4) and masks.shape == (len(labels), h, w)
    assert torch.isfinite(boxes).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert ((labels >= 1) & (labels <= num_classes)).all()


def test_fuzz_loader_raises_only_data_errors(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    transforms = build_transforms(train=True, min_sizes=[16, 24, 40], max_size=64, flip_prob=0.5)
    seen: Counter = Counter()

    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=fuzz_coco(), filter_empty=st.booleans())
    def run(case: tuple[dict, bool], filter_empty: bool) -> None:
        data, mutated = case
        f = tmp_path / "fuzz.json"
        f.write_text(json.dumps(data))
        _write_fuzz_images(folder, data)
        try:
            ds = CocoDetection(images=folder, annotations=f, transforms=transforms, filter_empty=filter_empty)
        except DataError as e:
            # A training set left empty by skipped geometry still reached the geometry checks.
            seen["geometry" if "no images to use" in str(e) else "structure"] += 1
            return
        seen["geometry"] += 1
        for i in range(len(ds)):
            try:
                image, target = ds[(i, 1000 + i)]
            except DataError:
                assert mutated, "a sample of a structurally valid file that loaded failed to decode"
                continue
            _check_sample(image, target, ds.num_classes)
            seen["samples"] += 1
            seen["instances"] += len(target["labels"])

    run()
    examples = seen["geometry"] + seen["structure"]
    print(f"fuzz: {seen['geometry']} of {examples} examples reach geometry; {seen['samples']} samples, "
          f"{seen['instances']} instances decoded")
    # The mix hypothesis draws depends on the whole collected session, not on this test alone (measured,
    # same code: 311 of 400 run alone, 276 of 400 in the full suite): the guard is that most examples get
    # past the structure checks, so a fuzzer that only broke the JSON's structure would fail here.
    assert seen["geometry"] >= 0.6 * examples and seen["instances"] > 50
