"""Pascal VOC: the XML layout written from COCO (``coco_to_voc``), read as a dataset (``VocDetection``), and
VOC box mAP (``evaluate_voc``: the VOC2007 11-point metric and the VOC2010+ area metric); ``load_voc`` reads what a
config names (``data.*.format: voc``, one or more roots) and ``voc_metrics`` scores results on it
(``evaluation.evaluate_model_voc`` scores a model).

Coordinates. VOC's ``bndbox`` holds 1-based, inclusive pixel indices: ``xmin=1, xmax=W`` is the whole width.
scratchdet's boxes (CocoDetection's targets, the model's outputs, COCO results) are continuous, 0-based:
``[0, W]`` is the whole width. The two are related as detectron2's VOC loader and evaluator relate them:
``x0 = xmin - 1, x1 = xmax`` (and the same for y), so a VOC box of ``xmax - xmin + 1`` pixels is a continuous
box of that width. Evaluation computes the devkit's overlap on VOC coordinates, with its ``+ 1`` in every
width and height; on boxes converted as above that is exactly the continuous IoU, so a detection equal to
its ground truth has IoU 1.

Difficult objects. VOC marks objects too hard to require (small, heavily occluded) ``difficult``; the devkit
matches detections to them but counts such a match neither as a true nor as a false positive, and leaves
them out of the number of positives. ``VocDetection`` keeps them in the training targets by default, as
detectron2 does ("they don't hurt accuracy"; py-faster-rcnn's ``use_diff=False`` left them out):
``keep_difficult=False`` leaves them out. COCO's crowd regions are written as difficult objects, because
COCO's evaluation ignores crowd regions as VOC's ignores difficult objects.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .data import ROUNDING_PX, DataError, LoadReport, image_to_chw, load_coco_json, read_image, sample_rng

log = logging.getLogger(__name__)


# What a run with a VOC validation set writes: its detections (COCO-style, category id = label), the
# per-class tables of the last evaluation, and the two means logged in metrics.jsonl (percent).
VOC_RESULTS = "voc_detections.json"
VOC_TABLES = "voc_eval.txt"
VOC_MEANS = ("voc/mAP07", "voc/mAP")


@dataclass
class VocRecord:
    """One image of a VOC split: its objects in VOC coordinates (1-based inclusive pixels), all of them."""

    id: int  # the dataset's integer image id (VocDetection explains how it is chosen)
    name: str  # the VOC id: the file stem in Annotations/, JPEGImages/ and ImageSets/Main/
    height: int
    width: int
    boxes: np.ndarray  # [N, 4] float64 xmin, ymin, xmax, ymax as in the XML (clipped to the image where needed)
    labels: np.ndarray  # [N] int64, 1..K
    difficult: np.ndarray  # [N] bool
    root: Path | None = None  # the VOC root holding the image (``load_voc`` joins several roots into one dataset)


# ---- COCO -> VOC --------------------------------------------------------------------------------------------


@dataclass
class VocExport:
    """What ``coco_to_voc`` wrote."""

    images: int = 0
    objects: int = 0
    difficult: int = 0  # crowd annotations written as difficult objects
    copied: int = 0  # JPEG files copied unchanged
    reencoded: int = 0  # other images written as JPEG
    class_names: list[str] = field(default_factory=list)
    report: LoadReport = field(default_factory=LoadReport)  # what the COCO reader skipped or repaired


def _fmt(v: float) -> str:
    """A coordinate for the XML: an integer without a decimal point, else the shortest exact float."""
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def _sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = text
    return el


def _annotation_xml(*, name: str, source_json: str, file_name: str, width: int, height: int, depth: int,
                    objects: list[tuple[str, list[float], int]]) -> bytes:
    """A VOC annotation file: size, and each object's name, bndbox (VOC coordinates) and difficult flag."""
    root = ET.Element("annotation")
    _sub(root, "folder", "JPEGImages")
    _sub(root, "filename", f"{name}.jpg")
    source = _sub(root, "source")
    _sub(source, "database", "COCO")
    _sub(source, "annotation", source_json)
    _sub(source, "image", file_name)
    size = _sub(root, "size")
    _sub(size, "width", str(width))
    _sub(size, "height", str(height))
    _sub(size, "depth", str(depth))
    _sub(root, "segmented", "0")
    for cls, box, difficult in objects:
        obj = _sub(root, "object")
        _sub(obj, "name", cls)
        _sub(obj, "pose", "Unspecified")
        _sub(obj, "truncated", "0")  # COCO does not record truncation
        _sub(obj, "difficult", str(difficult))
        bndbox = _sub(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
            _sub(bndbox, tag, _fmt(v))
    ET.indent(root, space="\t")
    return (ET.tostring(root, encoding="unicode") + "\n").encode("utf-8")


def _write_image(src: Path, dst: Path, *, width: int, height: int, where: str, quality: int) -> tuple[bool, int]:
    """Write ``src`` as the JPEG ``dst``: a copy when it is a JPEG already (its pixels kept); ``(copied, depth)``."""
    try:
        with Image.open(src) as im:
            fmt, size, bands = im.format, im.size, len(im.getbands())
            orientation = im.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise DataError(f"{src}: image file not found ({where})") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{src}: cannot read {where}: {e}") from None
    # A JPEG whose stored or EXIF-rotated size is the JSON's reads back as CocoDetection reads it (read_image).
    if fmt == "JPEG" and (size == (width, height) or (orientation in (5, 6, 7, 8) and size == (height, width))):
        shutil.copyfile(src, dst)
        return True, bands
    # Anything else is decoded as the loader decodes it (RGB, EXIF as the JSON's size says) and encoded once.
    rgb = read_image(src, expected_size=(width, height), where=where)
    rgb.save(dst, format="JPEG", quality=quality)
    return False, 3


def coco_to_voc(annotations: str | Path, images: str | Path, out_dir: str | Path, *, split: str = "train",
                jpeg_quality: int = 95, overwrite: bool = False) -> VocExport:
    """Write a COCO instances dataset in VOC layout (boxes only) under ``out_dir``.

    ``out_dir/Annotations/<id>.xml`` per image (``<id>``: the COCO image id, zero-padded to 6 digits as VOC's
    ids), ``JPEGImages/<id>.jpg`` (JPEG sources copied byte for byte, others re-encoded at ``jpeg_quality``),
    ``ImageSets/Main/<split>.txt`` (the split's ids) and ``labels.txt`` (the class names in COCO's category id
    order, one a line, for ``read_class_names``: VOC itself has no class list). Boxes become VOC coordinates
    (``xmin = x + 1, ymin = y + 1, xmax = x + w, ymax = y + h``, as floats where COCO's are), COCO category
    names become VOC names unchanged (spaces included), crowd regions become ``difficult`` objects: COCO's
    evaluation ignores crowd regions as VOC's ignores difficult objects. The COCO file is read and checked as
    ``CocoDetection`` reads it (annotations it would skip are not written; ``report`` counts them).

    Several splits may share ``out_dir`` (VOC's layout: one folder, several image sets); an existing
    annotation file with other content (the same image id in two COCO files) is an error unless ``overwrite``.
    """
    annotations, images, out = Path(annotations), Path(images), Path(out_dir)
    if not re.fullmatch(r"[\w.-]+", split):
        raise DataError(f"split name {split!r}: use letters, digits, '_', '.' or '-' (it names a file)")
    records, categories, report = load_coco_json(annotations)
    by_name: dict[str, int] = {}
    for c in categories:
        if not c["name"].strip():
            raise DataError(f"{annotations}: category id {c['id']} has an empty name (VOC identifies classes by name)")
        if c["name"] in by_name:
            raise DataError(f"{annotations}: categories {by_name[c['name']]} and {c['id']} share the name "
                            f"{c['name']!r} (VOC identifies classes by name)")
        by_name[c["name"]] = c["id"]
    cat_name = {c["id"]: c["name"] for c in categories}
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    stats = VocExport(class_names=[cat_name[cid] for cid in sorted(cat_name)], report=report)
    names = []
    for rec in records:
        name = f"{rec.id:06d}"
        where = f"image id {rec.id} in {annotations}"
        objects = []
        for ann in rec.anns:
            x, y, w, h = (float(v) for v in ann["bbox"])
            crowd = int(bool(ann.get("iscrowd", 0)))
            objects.append((cat_name[ann["category_id"]], [x + 1, y + 1, x + w, y + h], crowd))
        xml_path = out / "Annotations" / f"{name}.xml"
        image_path = out / "JPEGImages" / f"{name}.jpg"
        # The depth field needs the image; the image is written after the check below so a refused file changes nothing.
        tmp = image_path.with_name(f".{name}.jpg.tmp")
        copied, depth = _write_image(images / rec.file_name, tmp, width=rec.width, height=rec.height, where=where,
                                     quality=jpeg_quality)
        xml = _annotation_xml(name=name, source_json=annotations.name, file_name=rec.file_name, width=rec.width,
                              height=rec.height, depth=depth, objects=objects)
        if not overwrite and xml_path.is_file() and xml_path.read_bytes() != xml:
            tmp.unlink()
            raise DataError(f"{xml_path} exists with other content than {where} gives (the same image id in another "
                            "COCO file?); write to another folder, or pass overwrite")
        tmp.replace(image_path)
        xml_path.write_bytes(xml)
        names.append(name)
        stats.images += 1
        stats.objects += len(objects)
        stats.difficult += sum(o[2] for o in objects)
        stats.copied += copied
        stats.reencoded += not copied
    (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    (out / "labels.txt").write_text("".join(f"{n}\n" for n in stats.class_names))
    return stats


def main_to_voc(args: argparse.Namespace) -> int:
    """``scratchdet data to-voc --annotations F --images DIR --out DIR [--split NAME] [--overwrite]``."""
    stats = coco_to_voc(args.annotations, args.images, args.out, split=args.split,
                        overwrite=getattr(args, "overwrite", False))
    print(f"wrote {stats.images} images ({stats.copied} JPEG copied, {stats.reencoded} re-encoded) and "
          f"{stats.objects} objects ({stats.difficult} crowd regions as difficult) of {len(stats.class_names)} "
          f"classes to {args.out} (ImageSets/Main/{args.split}.txt); skipped or repaired: {stats.report.summary()}")
    print(f"class names in COCO's order: {Path(args.out) / 'labels.txt'}")
    print(f"train with: scratchdet train model.task=boxes data.train.format=voc data.train.images={args.out} "
          f"data.train.annotations={args.split} (and data.val.* likewise for a validation image set)")
    return 0


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a text file, one a line (``labels.txt`` as ``coco_to_voc`` writes it); blank lines ignored."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise DataError(f"{path}: class list not found") from None
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path}: class names listed twice: {dup}")
    if not names:
        raise DataError(f"{path}: no class names")
    return names


# ---- reading VOC ------------------------------------------------------------------------------------------


@dataclass
class _RawObject:
    name: str
    box: list[float]  # VOC coordinates as in the file
    difficult: bool
    where: str


def _text(el: ET.Element | None) -> str | None:
    return None if el is None or el.text is None else el.text.strip()


def _parse_annotation(path: Path) -> tuple[int, int, list[_RawObject]]:
    """An Annotations/*.xml file's ``(width, height, objects)``; structural problems are DataErrors naming the file."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except ET.ParseError as e:
        raise DataError(f"{path}: not valid XML ({e})") from None
    size = []
    for tag in ("width", "height"):
        text = _text(root.find(f"size/{tag}"))
        try:
            v = float(text) if text is not None else math.nan
        except ValueError:
            v = math.nan
        if not (v > 0 and v.is_integer()):  # NaN fails too
            raise DataError(f"{path}: missing or invalid size/{tag} ({text!r}; a positive integer is required)")
        size.append(int(v))
    objects = []
    for k, obj in enumerate(root.findall("object"), start=1):
        where = f"{path}: object[{k}]"
        name = _text(obj.find("name"))
        if not name:
            raise DataError(f"{where}: missing <name>")
        box = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = _text(obj.find(f"bndbox/{tag}"))
            try:
                box.append(float(text))  # NaN and Inf parse: geometry, counted by the caller
            except (TypeError, ValueError):
                raise DataError(f"{where} ({name!r}): bndbox/{tag} is missing or not a number ({text!r})") from None
        difficult = _text(obj.find("difficult"))
        if difficult not in (None, "", "0", "1"):  # py-faster-rcnn and the devkit read an absent flag as 0
            raise DataError(f"{where} ({name!r}): difficult must be 0 or 1, got {difficult!r}")
        objects.append(_RawObject(name, box, difficult == "1", where))
    return size[0], size[1], objects


def _check_box(obj: _RawObject, width: int, height: int, report: LoadReport) -> list[float] | None:
    """The object's box in VOC coordinates, clipped to the image; None (counted in ``report``) if unusable."""
    xmin, ymin, xmax, ymax = obj.box
    if not all(math.isfinite(v) for v in obj.box):
        report.add("objects with a non-finite bndbox", obj.where)
        return None
    # In continuous coordinates [xmin - 1, xmax]: a box has positive width iff xmax > xmin - 1, which for VOC's
    # integers is xmax >= xmin (a one-pixel box has xmin == xmax).
    x0, y0, x1, y1 = xmin - 1, ymin - 1, xmax, ymax
    if x1 <= x0 or y1 <= y0:
        report.add("objects with an empty bndbox (xmax < xmin or ymax < ymin)", obj.where)
        return None
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if cx1 <= cx0 or cy1 <= cy0:
        report.add("objects whose bndbox lies outside the image", obj.where)
        return None
    if max(cx0 - x0, cy0 - y0, x1 - cx1, y1 - cy1) > ROUNDING_PX:
        report.add("bndboxes clipped to the image (repaired)", obj.where)
        return [cx0 + 1, cy0 + 1, cx1, cy1]
    return [xmin, ymin, xmax, ymax]


def _image_ids(names: Sequence[str]) -> list[int]:
    """Integer ids for VOC ids: the number itself where every id is one (``000005`` -> 5, ``2008_000123`` ->
    2008000123, so ids survive subsets and the 07+12 union), else the position in the split file (1-based)."""
    if all(re.fullmatch(r"\d+(_\d+)?", n) for n in names):
        ids = [int(n.replace("_", "")) for n in names]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(1, len(names) + 1))


class VocDetection(Dataset):
    """A Pascal VOC split (``root/ImageSets/Main/<split>.txt``, ``Annotations/``, ``JPEGImages/``) with
    CocoDetection's items and methods: item ``key`` (an index, or ``(index, seed)``) -> ``(image [3, H, W] uint8,
    target)`` with ``boxes`` [N, 4] continuous xyxy float (``xmin - 1, ymin - 1, xmax, ymax``), ``labels`` [N]
    int64 (1..K), ``image_id``, ``orig_size`` (H0, W0) and ``seed``; no masks (boxes only).

    Classes: ``class_names`` in their order (an object of another class is an error), else the names found in
    the split, sorted; label k is class ``class_names[k - 1]``, and the category id of results is the label
    (VOC has no ids). Give a validation split the training split's ``class_names``. Image ids: the VOC id as a
    number where every id of the split is one (``000005`` -> 5), else the position in the split file.
    Difficult objects are in ``records`` (for ``evaluate_voc``) and in the training targets unless
    ``keep_difficult`` is false.
    """

    def __init__(self, root: str | Path, split: str, *, transforms: v2.Transform | None = None,
                 filter_empty: bool = False, class_names: Sequence[str] | None = None,
                 keep_difficult: bool = True) -> None:
        self.root, self.split = Path(root), split
        self.transforms, self.keep_difficult = transforms, keep_difficult
        self.report = LoadReport()
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        try:
            lines = split_file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise DataError(f"{split_file}: image set file not found (split {split!r} of {self.root})") from None
        names = [line.split()[0] for line in lines if line.strip()]
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise DataError(f"{split_file}: image {n!r} listed twice")
            seen.add(n)
        parsed = [(n, *_parse_annotation(self.root / "Annotations" / f"{n}.xml")) for n in names]
        if class_names is None:
            class_names = sorted({o.name for _, _, _, objs in parsed for o in objs})
        self.class_names = list(class_names)
        if len(set(self.class_names)) != len(self.class_names):
            raise DataError(f"class_names lists a name twice: {self.class_names}")
        label = {c: k for k, c in enumerate(self.class_names, start=1)}
        # Contiguous labels 1..K, and VOC's missing category ids defined as the labels themselves.
        self.label_to_cat_id = {k: k for k in label.values()}
        self.cat_id_to_label = dict(self.label_to_cat_id)
        records = []
        for image_id, (n, width, height, objs) in zip(_image_ids(names), parsed):
            boxes, labels, difficult = [], [], []
            for o in objs:
                if o.name not in label:
                    raise DataError(f"{o.where}: class {o.name!r} is not one of the {len(label)} class_names")
                box = _check_box(o, width, height, self.report)
                if box is not None:
                    boxes.append(box)
                    labels.append(label[o.name])
                    difficult.append(o.difficult)
            records.append(VocRecord(image_id, n, height, width, np.asarray(boxes, np.float64).reshape(-1, 4),
                                     np.asarray(labels, np.int64), np.asarray(difficult, bool), root=self.root))
        if filter_empty:
            kept = [r for r in records if len(self._trained(r))]
            if len(kept) < len(records):
                self.report.skipped["training images without annotations (data.filter_empty)"] += len(records) - len(kept)
            records = kept
        if not records:
            raise DataError(f"{split_file}: no images to use ({self.report.summary()})")
        for r in records:  # a missing file is found now, not hours into training
            if not self.image_path(r).is_file():
                raise DataError(f"{self.image_path(r)}: image file not found (image {r.name!r} of {split_file})")
        self.records = records

    def _trained(self, rec: VocRecord) -> np.ndarray:
        """Indices of the record's objects that go into training targets."""
        return np.arange(len(rec.labels)) if self.keep_difficult else np.flatnonzero(~rec.difficult)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def aspect_ratios(self) -> list[float]:
        """width / height of every image, from the XML (no image is opened)."""
        return [r.width / r.height for r in self.records]

    def image_ids(self) -> list[int]:
        return [r.id for r in self.records]

    def keep(self, image_ids: Sequence[int]) -> None:
        """Restrict the dataset to these image ids (in the dataset's order)."""
        wanted = set(image_ids)
        self.records = [r for r in self.records if r.id in wanted]

    def image_path(self, rec: VocRecord) -> Path:
        # JPEGImages/<id>.jpg, as the devkit, torchvision and detectron2 find it (the XML's <filename> is not read).
        return (rec.root or self.root) / "JPEGImages" / f"{rec.name}.jpg"

    def image_file(self, rec: VocRecord) -> tuple[Path, str]:
        """The record's image file, and how an error names the image."""
        return self.image_path(rec), f"image {rec.name!r} of {rec.root or self.root}"

    def load_image(self, rec: VocRecord) -> Image.Image:
        """The record's image as 8-bit RGB of the XML's size (``read_image``)."""
        path, where = self.image_file(rec)
        return read_image(path, expected_size=(rec.width, rec.height), where=where)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        rec = self.records[index]
        pil = self.load_image(rec)
        keep = self._trained(rec)
        voc = rec.boxes[keep]
        xyxy = np.stack([voc[:, 0] - 1, voc[:, 1] - 1, voc[:, 2], voc[:, 3]], axis=1)
        h, w = rec.height, rec.width
        boxes = tv_tensors.BoundingBoxes(torch.from_numpy(xyxy).float(), format="XYXY", canvas_size=(h, w))
        labels = torch.from_numpy(rec.labels[keep])
        image: torch.Tensor = tv_tensors.Image(image_to_chw(pil))
        if self.transforms is not None:
            # torchvision's own protocol (no masks to render, so no need of DetectionTransforms.apply); the same
            # draws from the sample's seed as CocoDetection.
            with sample_rng(seed):
                image, target = self.transforms(image, {"boxes": boxes, "labels": labels})
            boxes, labels = target["boxes"], target["labels"]
        target = {
            "boxes": boxes.as_subclass(torch.Tensor),
            "labels": labels,
            "image_id": rec.id,
            "orig_size": (h, w),
            "seed": seed,  # the sample's own seed: the model draws its anchor/RoI samples from it too
        }
        return image.as_subclass(torch.Tensor), target


# ---- VOC as a config names it (data.train / data.val with format voc) ----------------------------------------


def voc_sets(images: str, annotations: str) -> list[tuple[Path, str]]:
    """``(root, image set)`` pairs from ``data.*.images`` / ``data.*.annotations`` of format voc: one or more
    VOC roots separated by commas, and one image set name for all of them or one per root (VOC07+12:
    ``images=VOC2007,VOC2012 annotations=trainval``)."""
    roots = [r.strip() for r in str(images).split(",") if r.strip()]
    splits = [s.strip() for s in str(annotations).split(",") if s.strip()]
    if not roots or not splits:
        raise DataError(f"format voc: give the VOC root(s) in images ({images!r}) and the image set name(s) in "
                        f"annotations ({annotations!r})")
    if len(splits) == 1:
        splits = splits * len(roots)
    if len(splits) != len(roots):
        raise DataError(f"format voc: {len(splits)} image set names ({annotations!r}) for {len(roots)} VOC roots "
                        f"({images!r}); give one name for all roots or one per root")
    return [(Path(r), s) for r, s in zip(roots, splits)]


def voc_present(images: str, annotations: str) -> bool:
    """Whether every image set file of ``voc_sets`` exists (a dry run describes a preset whose data is not in place)."""
    return all((root / "ImageSets" / "Main" / f"{split}.txt").is_file() for root, split in voc_sets(images, annotations))


def _labels_file_names(roots: Sequence[Path]) -> list[str] | None:
    """The class list of the roots' ``labels.txt`` (as ``coco_to_voc`` writes it), None where none has one."""
    found = [(root / "labels.txt", read_class_names(root / "labels.txt")) for root in roots
             if (root / "labels.txt").is_file()]
    for path, names in found[1:]:
        if names != found[0][1]:
            raise DataError(f"{path} and {found[0][0]} list different classes; the roots of one dataset need one "
                            "class list")
    return found[0][1] if found else None


def load_voc(images: str, annotations: str, *, class_names: Sequence[str] | None = None,
             transforms: v2.Transform | None = None, filter_empty: bool = False,
             keep_difficult: bool = True) -> VocDetection:
    """The VOC dataset a config names (``voc_sets``): one ``VocDetection``, the image sets of several roots joined.

    Classes: ``class_names`` if given (a validation set gets the training set's); else the roots' ``labels.txt``
    (``coco_to_voc``'s, COCO's order); else the names found in all the image sets, sorted (for VOC itself,
    the 20 classes in the devkit's alphabetical order). Image ids must differ across roots (VOC2007's
    ``000005`` is 5, VOC2012's ``2008_000005`` is 2008000005): an id in two roots is an error, as
    subsets and evaluation find images by id.
    """
    sets = voc_sets(images, annotations)
    if class_names is None:
        class_names = _labels_file_names([root for root, _ in sets])
    parts = [VocDetection(root, split, transforms=transforms, filter_empty=filter_empty, class_names=class_names,
                          keep_difficult=keep_difficult) for root, split in sets]
    ds = parts[0]
    if len(parts) == 1:
        return ds
    if class_names is None:
        # Each image set found its own classes: relabel every part in the sorted union's order.
        names = sorted(set().union(*(p.class_names for p in parts)))
        for p in parts:
            lut = np.array([0] + [names.index(c) + 1 for c in p.class_names], np.int64)
            for r in p.records:
                r.labels = lut[r.labels]
        ds.class_names = names
        ds.label_to_cat_id = {k: k for k in range(1, len(names) + 1)}
        ds.cat_id_to_label = dict(ds.label_to_cat_id)
    where = {r.id: (r.name, ds.root, ds.split) for r in ds.records}
    for p in parts[1:]:
        for r in p.records:
            if r.id in where:
                name, root, split = where[r.id]
                raise DataError(f"{p.root / 'ImageSets/Main' / (p.split + '.txt')}: image {r.name!r} has image id "
                                f"{r.id}, as image {name!r} of {root / 'ImageSets/Main' / (split + '.txt')} has; "
                                "image ids must differ across VOC roots")
            where[r.id] = (r.name, p.root, p.split)
        ds.records += p.records
        ds.report.skipped.update(p.report.skipped)
    ds.split = "+".join(s for _, s in sets)
    return ds


def voc_metrics(gt: VocDetection, results: Sequence[dict], image_ids: Iterable[int] | None = None,
                *, iou: float = 0.5) -> tuple[dict[str, float], str]:
    """Both VOC metrics of COCO-style results (``category_id`` = label): ``{"voc/mAP07", "voc/mAP",
    "voc/AP07/<class>", "voc/AP/<class>"}`` in percent, and both per-class tables as text."""
    image_ids = None if image_ids is None else list(image_ids)
    out: dict[str, float] = {}
    texts = []
    for suffix, use_07 in (("07", True), ("", False)):
        stats, text = evaluate_voc(gt, results, use_07_metric=use_07, iou=iou, image_ids=image_ids)
        out[f"voc/mAP{suffix}"] = round(stats["mAP"], 4)
        out.update({f"voc/AP{suffix}/{k[3:]}": round(v, 4) for k, v in stats.items() if k.startswith("AP/")})
        texts.append(text)
    return out, "\n".join(texts)


# ---- VOC mAP --------------------------------------------------------------------------------------------------


def voc_ap(recall: np.ndarray, precision: np.ndarray, *, use_07_metric: bool) -> float:
    """AP from the cumulative recall and precision of detections in descending score order (the devkit's)."""
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if use_07_metric:
        # VOC2007: the mean over recall thresholds 0, 0.1, ..., 1 of the best precision at recall >= t (0 if none).
        # The thresholds are k * 0.1 in floating point, np.arange(0, 1.1, 0.1) as in py-faster-rcnn's voc_eval,
        # Detectron's and detectron2's (where published VOC07 numbers come from): the fourth is 0.30000000000000004,
        # so a recall of exactly 3/10 (or 6/10, 7/10) falls short of its threshold there, and here too.
        ap = 0.0
        for t in np.arange(11) * 0.1:
            above = precision[recall >= t]
            ap += (above.max() if len(above) else 0.0) / 11
        return float(ap)
    # VOC2010+: the area under the precision envelope (precision made non-increasing in recall), summed where
    # recall changes; recall runs from 0 to 1 with precision 0 at both sentinels.
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _devkit_iou(box: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The devkit's overlap of one VOC box with each of ``gt`` [M, 4]: inclusive pixels, hence the + 1s."""
    iw = np.minimum(box[2], gt[:, 2]) - np.maximum(box[0], gt[:, 0]) + 1
    ih = np.minimum(box[3], gt[:, 3]) - np.maximum(box[1], gt[:, 1]) + 1
    inter = iw * ih
    union = (box[2] - box[0] + 1) * (box[3] - box[1] + 1) + (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1) - inter
    # The devkit considers only ground truth that overlaps in both directions.
    return np.where((iw > 0) & (ih > 0), inter / union, -np.inf)


def _read_detections(detections: Sequence[dict], *, box_format: str, label_of: dict[int, int],
                     known_ids: set[int]) -> list[tuple[int, int, float, np.ndarray]]:
    """``(image id, label, score, VOC box)`` per detection; malformed ones are DataErrors naming their index."""
    if box_format not in ("xywh", "xyxy"):
        raise ValueError(f"box_format {box_format!r} is not 'xywh' or 'xyxy'")
    out = []
    for k, d in enumerate(detections):
        where = f"detection {k}"
        if not isinstance(d, dict):
            raise DataError(f"{where}: not an object ({d!r:.80})")
        image_id, cat, score, bbox = d.get("image_id"), d.get("category_id"), d.get("score"), d.get("bbox")
        if image_id not in known_ids:
            raise DataError(f"{where}: image id {image_id!r} is not in the ground truth")
        if cat not in label_of:
            raise DataError(f"{where}: category id {cat!r} is not one of the ground truth's {sorted(label_of)}")
        try:
            values = [float(v) for v in bbox]
            score = float(score)
        except (TypeError, ValueError):
            raise DataError(f"{where}: 'bbox' must be 4 numbers and 'score' a number") from None
        if len(values) != 4 or not all(math.isfinite(v) for v in [*values, score]):
            raise DataError(f"{where}: 'bbox' must be 4 finite numbers and 'score' finite, got {bbox!r}, {score!r}")
        x0, y0, a, b = values
        x1, y1 = (x0 + a, y0 + b) if box_format == "xywh" else (a, b)
        if x1 < x0 or y1 < y0:
            raise DataError(f"{where}: box with negative width or height ({box_format} {bbox!r})")
        # Continuous [x0, x1] is the VOC pixel range [x0 + 1, x1]: the inverse of VocDetection's conversion.
        out.append((image_id, label_of[cat], score, np.array([x0 + 1, y0 + 1, x1, y1])))
    return out


def _class_tp_fp(dets: list[tuple[int, float, np.ndarray]], gt: dict[int, tuple[np.ndarray, np.ndarray]],
                 iou: float) -> tuple[np.ndarray, np.ndarray]:
    """One class's true/false positive flags in descending score order, matched as the devkit matches."""
    # A stable sort: detections of equal score stay in input order (the devkit's MATLAB sort is stable too).
    order = sorted(range(len(dets)), key=lambda i: -dets[i][1])
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    matched = {image_id: np.zeros(len(boxes), bool) for image_id, (boxes, _) in gt.items()}
    for rank, i in enumerate(order):
        image_id, _, box = dets[i]
        boxes, difficult = gt.get(image_id, (np.zeros((0, 4)), np.zeros(0, bool)))
        ov = _devkit_iou(box, boxes) if len(boxes) else np.zeros(0)
        if not len(ov) or ov.max() < iou:  # the devkit's test is ovmax >= minoverlap
            fp[rank] = 1
            continue
        j = int(np.argmax(ov))  # the best-overlapping object, difficult or already matched (first of equals)
        if difficult[j]:
            continue  # neither a true nor a false positive
        if matched[image_id][j]:
            fp[rank] = 1  # a duplicate detection
        else:
            tp[rank] = 1
            matched[image_id][j] = True
    return tp, fp


def evaluate_voc(gt: VocDetection | Sequence[VocRecord], detections: Sequence[dict] | str | Path, *,
                 use_07_metric: bool, iou: float = 0.5, box_format: str = "xywh",
                 class_names: Sequence[str] | None = None,
                 image_ids: Iterable[int] | None = None) -> tuple[dict[str, float], str]:
    """VOC box AP per class and their mean, in percent: ``({"mAP": ..., "AP/<class>": ...}, summary text)``.

    ``detections``: result dicts ``{image_id, category_id, bbox, score}`` (or a JSON file of them) as
    ``evaluation.to_coco_results`` writes them with ``label_to_cat_id`` of the VocDetection (category id =
    label), ``bbox`` continuous 0-based ``[x, y, w, h]`` (``box_format="xywh"``) or ``[x0, y0, x1, y1]``
    (``"xyxy"``); each becomes the VOC box ``[x0 + 1, y0 + 1, x1, y1]`` and is matched with the devkit's
    overlap (``+ 1`` in widths and heights), which on such boxes equals the continuous IoU. Matching is the
    devkit's: in descending score, each detection takes the object of its class and image it overlaps most;
    at ``>= iou`` it is a true positive if that object is unmatched, a false positive if matched, and ignored
    if the object is difficult. ``use_07_metric``: VOC2007's 11-point AP, else the area (VOC2010+). Classes
    without a non-difficult object have no AP and are left out of the mean. ``image_ids`` restricts the
    evaluation to those images (as ``evaluate_coco``'s ``img_ids``); results for other images are ignored.
    """
    if isinstance(gt, VocDetection):
        class_names = gt.class_names if class_names is None else class_names
        records: Sequence[VocRecord] = gt.records
    else:
        records = gt
    if class_names is None:
        class_names = [str(k) for k in range(1, 1 + max((int(r.labels.max()) for r in records if len(r.labels)),
                                                        default=0))]
    if isinstance(detections, (str, Path)):
        with open(detections) as f:
            detections = json.load(f)
    num_classes = len(class_names)
    known = {r.id for r in records}
    wanted = known if image_ids is None else set(image_ids) & known
    parsed = _read_detections(detections, box_format=box_format, label_of={k: k for k in range(1, num_classes + 1)},
                              known_ids=known)
    by_label: dict[int, list[tuple[int, float, np.ndarray]]] = {}
    for image_id, label, score, box in parsed:
        if image_id in wanted:
            by_label.setdefault(label, []).append((image_id, score, box))
    stats: dict[str, float] = {}
    lines = [f"VOC {'2007 11-point' if use_07_metric else 'area (VOC2010+)'} AP at IoU >= {iou:g}, "
             f"{len(wanted)} images", f"{'class':<24} {'objects':>8} {'difficult':>9} {'detections':>10} {'AP':>7}"]
    aps = []
    for label, name in enumerate(class_names, start=1):
        class_gt = {}
        npos = ndiff = 0
        for r in records:
            if r.id in wanted:
                sel = r.labels == label
                class_gt[r.id] = (r.boxes[sel], r.difficult[sel])
                npos += int((~r.difficult[sel]).sum())
                ndiff += int(r.difficult[sel].sum())
        dets = by_label.get(label, [])
        if not npos:
            lines.append(f"{name[:24]:<24} {npos:>8} {ndiff:>9} {len(dets):>10} {'-':>7}  (no objects: left out)")
            continue
        tp, fp = _class_tp_fp(dets, class_gt, iou)
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        # Where only difficult matches precede, tp + fp is 0: precision 0 there (the devkit's NaN is ignored by max).
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap = voc_ap(tp / npos, precision, use_07_metric=use_07_metric) * 100
        aps.append(ap)
        stats[f"AP/{name}"] = ap
        lines.append(f"{name[:24]:<24} {npos:>8} {ndiff:>9} {len(dets):>10} {ap:>7.2f}")
    if not aps:
        raise DataError("evaluate_voc: the ground truth has no object that is not difficult; there is nothing to score")
    stats = {"mAP": float(np.mean(aps)), **stats}
    lines.append(f"mAP over {len(aps)} classes: {stats['mAP']:.2f}")
    return stats, "\n".join(lines) + "\n"
