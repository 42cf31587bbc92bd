"""The bad-input catalogue (docs/bad_input.md): one test per row, plus a fuzz test of the loader."""

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from scratchdet.data import CocoDetection, DataError, load_coco_json

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


# (id, what, how to build the JSON, image writer, outcome, detail)
#   outcome "error": DataError at load, message matching detail (and the file name)
#   outcome "read": DataError when the image is read, matching detail
#   outcome "skip": loads; report counts detail once; annotation count after
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
     lambda d: Image.new("RGB", (41, 32)).save(d / "a.png"), "read", "image id 1 is 41x32 but .* says 40x32"),
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


def test_catalogue_document_lists_every_row():
    text = DOC.read_text()
    rows = re.findall(r"^\| (B\d\d) \|", text, flags=re.M)
    assert rows == [c[0] for c in CASES]
    assert len(rows) >= 30


# ---- fuzz: whatever the JSON, the loader either loads or raises DataError ----------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=True),
                         st.text(max_size=4))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=5),
                                                             st.dictionaries(st.text(max_size=6), c, max_size=4)),
                           max_leaves=12)


@st.composite
def messy_coco(draw):
    data = _base()
    for _ in range(draw(st.integers(1, 6))):
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
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=messy_coco())
def test_fuzz_loader_raises_only_data_errors(tmp_path, data):
    f = tmp_path / "fuzz.json"
    f.write_text(json.dumps(data))
    try:
        records, _, _ = load_coco_json(f)
    except DataError:
        return
    # Whatever loads is well-formed enough to decode every kept mask.
    from scratchdet.data import decode_mask

    for r in records:
        for a in r.anns:
            if not a.get("iscrowd"):
                mask = decode_mask(copy.deepcopy(a), r.height, r.width, str(f))
                assert mask.shape == (r.height, r.width)
