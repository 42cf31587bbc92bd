"""``scratchdet predict``: a run's detections drawn on images, and written as COCO results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from .data import ResizeShortestEdge, read_image
from .evaluation import to_coco_results
from .model import paste_detections
from .run import load_run_model, pick_device

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


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
    names it, since free images have no COCO ids.
    """
    dev = pick_device(device)
    model, cfg, meta = load_run_model(run_dir, checkpoint, dev)
    names = meta["class_names"]
    label_to_cat_id = {int(k): int(v) for k, v in meta["label_to_cat_id"].items()}
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
            results.append({**r, "file_name": str(path)})
        keep = det["scores"] >= score_thresh
        canvas = pixels
        labels = det["labels"][keep].tolist()
        colors = [PALETTE[(lab - 1) % len(PALETTE)] for lab in labels]
        if keep.any():
            if "masks" in det:  # Faster and Keypoint R-CNN have none
                canvas = draw_segmentation_masks(canvas, det["masks"][keep].cpu(), alpha=0.45, colors=colors)
            if "keypoints" in det:
                canvas = draw_keypoints(canvas, det["keypoints"][keep][..., :2].cpu() - 0.5, colors="white", radius=2)
            captions = [f"{names[lab - 1]} {s:.2f}" for lab, s in zip(labels, det["scores"][keep].tolist())]
            canvas = draw_bounding_boxes(canvas, det["boxes"][keep].cpu(), labels=captions, colors=colors, width=2)
        target = out / f"{path.stem}.png"
        Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(target)
        written.append(target)
    (out / "coco_results.json").write_text(json.dumps(results))
    return written
