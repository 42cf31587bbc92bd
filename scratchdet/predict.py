"""``scratchdet predict``: a run's detections drawn on images, and written as COCO results."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_keypoints

from .data import ResizeShortestEdge, read_image
from .device import pick_device
from .evaluation import to_coco_results
from .model import paste_detections
from .run import load_run_model

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# Sasha Trubetskoy's 20 distinct colours without white, black and the palest two (beige, mint), in his
# order: neighbours in the list differ most, and instances take them in score order.
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (128, 0, 0), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]
MASK_ALPHA = 0.45


def instance_colors(n: int) -> list[tuple[int, int, int]]:
    """A colour for each of ``n`` instances by its index, not its class: overlapping instances of one class stay apart."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def label_font(height: int, width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The labels' font, sized to the image (1/40 of its shorter side, at least 12 px): Pillow's own scalable font."""
    size = max(12, round(min(height, width) / 40))
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1; no TTF file needed
    except TypeError:  # older Pillow: its fixed bitmap font, still on a filled box
        return ImageFont.load_default()


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``background`` (ITU-R 601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_detections(pixels: torch.Tensor, det: dict[str, torch.Tensor], names: Sequence[str], *,
                    score_thresh: float) -> torch.Tensor:
    """Masks (or keypoints), boxes and "class score" labels of the detections scoring ``score_thresh`` or more."""
    # On a [3, H, W] uint8 image, each instance in its own colour, each label on a filled box.
    keep = (det["scores"] >= score_thresh).cpu()
    if not keep.any():
        return pixels
    labels, scores = det["labels"].cpu()[keep].tolist(), det["scores"].cpu()[keep].tolist()
    colors = instance_colors(len(labels))
    canvas = pixels
    if "masks" in det:  # Faster and Keypoint R-CNN have none
        # Painted here, not by torchvision's draw_segmentation_masks, which blacks out where masks
        # overlap: the best-scoring instance is painted last, on top, as detectron2's Visualizer does.
        paint = canvas.clone()
        for mask, color in zip(det["masks"].cpu()[keep].flip(0), colors[::-1]):
            paint[:, mask] = torch.tensor(color, dtype=paint.dtype)[:, None]
        canvas = (canvas * (1 - MASK_ALPHA) + paint * MASK_ALPHA).to(torch.uint8)
    if "keypoints" in det:
        canvas = draw_keypoints(canvas, det["keypoints"].cpu()[keep][..., :2] - 0.5, colors="white", radius=2)
    h, w = canvas.shape[-2:]
    image = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(image)
    font, line = label_font(h, w), max(2, round(min(h, w) / 300))
    boxes = det["boxes"].cpu()[keep].round().int().tolist()
    for (x0, y0, x1, y1), color in zip(boxes[::-1], colors[::-1]):
        draw.rectangle((x0, y0, x1, y1), outline=color, width=line)
    # Labels after every box, so no box line crosses one; each on a box of its instance's colour,
    # above the box's top left corner (inside it at the image's top edge), kept within the image.
    for (x0, y0, _, _), color, lab, score in zip(boxes[::-1], colors[::-1], labels[::-1], scores[::-1]):
        caption = f"{names[lab - 1]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        pad = max(2, (bottom - top) // 5)
        bw, bh = right - left + 2 * pad, bottom - top + 2 * pad
        x = min(max(x0, 0), max(w - bw, 0))
        y = y0 - bh if y0 - bh >= 0 else min(max(y0, 0), max(h - bh, 0))
        draw.rectangle((x, y, x + bw - 1, y + bh - 1), fill=color)
        draw.text((x + pad - left, y + pad - top), caption, fill=text_color(color), font=font)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def expand_images(paths: list[str]) -> list[Path]:
    """Image files, with folders expanded to the images in them (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image or folder")
    return out


@torch.no_grad()
def predict(images: list[str], *, run_dir: str, out_dir: str, score_thresh: float = 0.5,
            checkpoint: str | None = None, device: str = "auto") -> list[Path]:
    """Draw masks (or keypoints), boxes, class names and scores on each image (PNG) and write ``coco_results.json``.

    The results' ``image_id`` is the image's position in the list (1-based) and ``file_name``
    names it, since free images have no COCO ids; ``category_name`` is the class name the checkpoint holds.
    """
    dev = pick_device(device)
    model, cfg, meta = load_run_model(run_dir, checkpoint, dev)  # logs the checkpoint it loads
    names = meta["class_names"]  # the training set's, as the checkpoint holds them
    label_to_cat_id = {int(k): int(v) for k, v in meta["label_to_cat_id"].items()}
    cat_names = {cat: names[lab - 1] for lab, cat in label_to_cat_id.items()}
    resize = ResizeShortestEdge([cfg.data.min_size_test], cfg.data.max_size_test)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, results = [], []
    for k, path in enumerate(expand_images(images), start=1):
        pixels = torch.from_numpy(np.array(read_image(path))).permute(2, 0, 1).contiguous()
        h0, w0 = pixels.shape[-2:]
        net_input = resize(pixels)
        output = model([net_input.to(dev).float()])[0]
        det = paste_detections(output, tuple(net_input.shape[-2:]), (h0, w0))
        for r in to_coco_results(det, k, label_to_cat_id):
            results.append({**r, "category_name": cat_names[r["category_id"]], "file_name": str(path)})
        canvas = draw_detections(pixels, det, names, score_thresh=score_thresh)
        target = out / f"{path.stem}.png"
        Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(target)
        written.append(target)
    (out / "coco_results.json").write_text(json.dumps(results))
    return written
