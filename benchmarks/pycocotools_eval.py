"""The reference side of ``benchmarks/eval_speed.py``: score one COCO results file for box and mask AP with
pycocotools, as a detectron2-style user would, and write the 24 numbers as JSON.

    python benchmarks/pycocotools_eval.py GT.json RES.json --json STATS.json

The ground truth is loaded once for both types.  Results carrying both a bbox and a segmentation are
scored for ``segm`` without their boxes (as detectron2 writes segm results): pycocotools' loadRes would
otherwise take a mask's area from its box, and the small/medium/large numbers would use box areas.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotations")
    p.add_argument("results")
    p.add_argument("--json", required=True, help="write {'bbox/AP': ..., 'segm/AP': ...} (percent, unrounded) here")
    args = p.parse_args()
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        print("pycocotools is not installed: pip install 'scratchdet[bench]' (or pip install pycocotools)",
              file=sys.stderr)
        return 3
    stats: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(args.annotations)
        with open(args.results) as f:
            results = json.load(f)
        for iou_type in ("bbox", "segm"):
            res = results if iou_type == "bbox" else [{k: v for k, v in r.items() if k != "bbox"} for r in results]
            ev = COCOeval(gt, gt.loadRes(res), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            # The same arithmetic as scratchdet's evaluate_coco, so equal stats give equal floats.
            stats.update({f"{iou_type}/{k}": float(v) * 100 for k, v in zip(STAT_NAMES, ev.stats[:12])})
    with open(args.json, "w") as f:
        json.dump(stats, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
