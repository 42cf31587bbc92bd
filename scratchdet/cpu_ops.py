"""Both cores on a CPU: multi-threaded versions of the training step's single-threaded kernels.

Two of the training step's costliest parts on a CPU are single-threaded kernels: torchvision's
RoIAlign (forward and backward, about 30% of the default job's step) and the RPN's per-image
NMS (about 10%).  While they run, the other cores idle.  On the CPU scratchdet computes
RoIAlign with a fixed sampling ratio as gathers of feature rows (``_GatherRoIAlign``: the same
arithmetic as torchvision's kernel, bit for bit, in multi-threaded vectorized torch ops) and
splits the rest over a small thread pool (each kernel releases the GIL): RoIAlign with an
adaptive sampling ratio by chunks of RoIs, NMS by image.  Results are the same (the forward
and NMS bit for bit; the chunked RoIAlign's input gradient sums the chunks' partial gradients,
a fixed order, so runs stay deterministic).  CUDA takes the stock path.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops
from torchvision.ops.poolers import _setup_scales

_POOL: ThreadPoolExecutor | None = None


def _cpu_pool() -> ThreadPoolExecutor | None:
    """A pool of intra-step workers on multi-core CPUs (None with one thread)."""
    global _POOL
    n = min(torch.get_num_threads(), 4)
    if n < 2:
        return None
    if _POOL is None or _POOL._max_workers != n:
        _POOL = ThreadPoolExecutor(n, thread_name_prefix="scratchdet-op")
    return _POOL


class _ChunkedRoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign (aligned=False) over chunks of RoIs in parallel threads, in fp32."""

    @staticmethod
    def forward(ctx: Any, features: Tensor, rois: Tensor, scale: float, size: tuple[int, int], ratio: int,
                chunks: int) -> Tensor:
        pool = _cpu_pool()
        parts = list(torch.tensor_split(rois, chunks))
        ctx.save_for_backward(rois)
        ctx.meta = (scale, size, ratio, chunks, tuple(features.shape), features.dtype)
        run = partial(torch.ops.torchvision.roi_align, features, spatial_scale=scale, pooled_height=size[0],
                      pooled_width=size[1], sampling_ratio=ratio, aligned=False)
        outs = list(pool.map(lambda r: run(rois=r), parts)) if pool and chunks > 1 else [run(rois=rois)]
        return torch.cat(outs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        scale, size, ratio, chunks, (b, c, h, w), dtype = ctx.meta
        grad = grad.float().contiguous()
        run = partial(torch.ops.torchvision._roi_align_backward, spatial_scale=scale, pooled_height=size[0],
                      pooled_width=size[1], batch_size=b, channels=c, height=h, width=w, sampling_ratio=ratio,
                      aligned=False)
        pool = _cpu_pool()
        pairs = list(zip(torch.tensor_split(grad, chunks), torch.tensor_split(rois, chunks)))
        if pool and chunks > 1:
            parts = list(pool.map(lambda gr: run(gr[0], gr[1]), pairs))
            total = parts[0]
            for part in parts[1:]:
                total = total + part
        else:
            total = run(grad, rois)
        return total.to(dtype), None, None, None, None, None


def _sample_axis(start: Tensor, length: Tensor, bins: int, ratio: int, limit: int) -> tuple[Tensor, ...]:
    """One axis of torchvision's RoIAlign sampling (aligned=False) for R RoIs: the lower and upper
    neighbour, the weights of each, and whether the point counts, [R, bins * ratio] each.

    The fp32 operations and their order are torchvision's CPU kernel's (``roi_align_kernel.cpp``,
    ``bilinear_interpolate``), so every coordinate and weight is its value to the bit: points more
    than one cell outside the map count for nothing, points within one cell clamp to the border.
    """
    bin_size = length / bins
    step = torch.arange(bins, dtype=start.dtype, device=start.device).repeat_interleave(ratio)
    offset = (torch.arange(ratio, dtype=start.dtype, device=start.device) + 0.5).repeat(bins)
    y = start[:, None] + step * bin_size[:, None] + offset * bin_size[:, None] / ratio
    inside = (y >= -1.0) & (y <= limit)
    y = y.clamp(min=0)
    low = y.long()  # y >= 0 here: truncation is the kernel's (int) cast
    top = low >= limit - 1
    low = torch.where(top, limit - 1, low)
    y = torch.where(top, low.to(y.dtype), y)
    high = torch.where(top, low, low + 1)
    frac = y - low
    return low, high, frac, 1.0 - frac, inside


def _roi_corners(rois: Tensor, scale: float, size: tuple[int, int], ratio: int, h: int,
                 w: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Row indices into a level's [N * H * W, C] rows and bilinear weights, [R, oh, ow, ratio**2, 4]
    each (bin, then sample in torchvision's y-x order, then the four corners in its order), and the
    mask of the entries that count, of the same shape (None when all do)."""
    (oh, ow), r = size, len(rois)
    x1, y1, x2, y2 = (rois[:, k] * scale for k in range(1, 5))
    y_low, y_high, ly, hy, y_in = _sample_axis(y1, torch.clamp(y2 - y1, min=1.0), oh, ratio, h)
    x_low, x_high, lx, hx, x_in = _sample_axis(x1, torch.clamp(x2 - x1, min=1.0), ow, ratio, w)
    base = rois[:, 0].long()[:, None] * h
    y_low, y_high = (base + y_low) * w, (base + y_high) * w

    def outer(a: Tensor, b: Tensor, op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        return op(a.view(r, oh, 1, ratio, 1), b.view(r, 1, ow, 1, ratio))

    add, mul = torch.add, torch.mul
    idx = torch.stack([outer(y_low, x_low, add), outer(y_low, x_high, add), outer(y_high, x_low, add),
                       outer(y_high, x_high, add)], -1).view(r, oh, ow, ratio * ratio, 4)
    wt = torch.stack([outer(hy, hx, mul), outer(hy, lx, mul), outer(ly, hx, mul), outer(ly, lx, mul)],
                     -1).view(r, oh, ow, ratio * ratio, 4)
    inside = outer(y_in, x_in, torch.logical_and)
    if bool(inside.all()):
        return idx, wt, None
    # The kernel's empty sample: index 0 with weight 0 in the forward, no gradient at all.
    inside = inside.view(r, oh, ow, ratio * ratio, 1).expand(-1, -1, -1, -1, 4)
    return torch.where(inside, idx, 0), torch.where(inside, wt, 0.0), inside


def _fp32_rows(feature: Tensor) -> Tensor:
    """A feature map [N, C, H, W] as fp32 rows [N * H * W, C]: a view for a channels-last fp32 map,
    else one copy."""
    n, c, h, w = feature.shape
    x = feature.permute(0, 2, 3, 1)
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)
    return x.view(n * h * w, c)


_GATHER_CHUNK_BYTES = 8 << 20  # gathered fp32 corner rows per chunk: a few RoIs' worth stays in cache


class _GatherRoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign (aligned=False, a fixed sampling ratio) of RoIs over FPN levels, as
    gathers of feature rows, fp32 inside and bit for bit its values and input gradients.

    torchvision's CPU kernel is scalar and single-threaded: for each RoI, channel and bin it sums
    the four weighted corners of each sample point, then divides by the number of samples.  Here
    each level's feature map is read as rows of C channels (channels-last: a view), the four
    corners of every sample are gathered at once (``index_select``, each row a vector of
    channels), weighted and summed in the kernel's order; the backward scatters the weighted
    output gradient to the same rows (``index_add_``, in the kernel's order of RoIs, bins and
    samples).  RoIs go in chunks of about ``_GATHER_CHUNK_BYTES`` of gathered rows (the whole
    gather of 1200 inference RoIs is 60 MB; in chunks it ran 1.8x faster).  The result is
    ``[K, C, oh, ow]`` in the features' dtype and memory format.
    """

    @staticmethod
    def forward(ctx: Any, rois: Tensor, levels: Tensor | None, scales: tuple[float, ...], size: tuple[int, int],
                ratio: int, *features: Tensor) -> Tensor:
        c = features[0].shape[1]
        out = features[0].new_empty((len(rois), *size, c))
        chunk = max(1, _GATHER_CHUNK_BYTES // (size[0] * size[1] * ratio * ratio * 4 * c * 4))
        plan: list[tuple[Any, ...] | None] = []
        for level, (feature, scale) in enumerate(zip(features, scales)):
            idx = None if levels is None else torch.where(levels == level)[0]
            if idx is not None and len(idx) == 0:
                plan.append(None)
                continue
            corners, weights, inside = _roi_corners(rois if idx is None else rois[idx], scale, size, ratio,
                                                    *feature.shape[-2:])
            rows = _fp32_rows(feature)
            for start in range(0, len(corners), chunk):
                part = slice(start, start + chunk)
                picked = rows.index_select(0, corners[part].reshape(-1)).mul_(weights[part].reshape(-1, 1))
                picked = picked.view(-1, ratio * ratio, 4, c)
                # Each sample: ((w1 v1 + w2 v2) + w3 v3) + w4 v4; then the samples of a bin in order, / count.
                value = picked[:, :, 0].add(picked[:, :, 1]).add_(picked[:, :, 2]).add_(picked[:, :, 3])
                pooled = value[:, 0]
                for j in range(1, ratio * ratio):
                    pooled = pooled + value[:, j] if j == 1 else pooled.add_(value[:, j])
                if ratio > 1:
                    pooled = pooled / float(ratio * ratio)
                pooled = pooled.view(-1, *size, c)
                if idx is None:
                    out[part].copy_(pooled)
                else:
                    out.index_copy_(0, idx[part], pooled.to(out.dtype))
            plan.append((idx, corners, weights, inside, feature.shape, feature.dtype,
                         feature.is_contiguous(memory_format=torch.channels_last)))
        ctx.plan, ctx.size, ctx.ratio, ctx.chunk = plan, size, ratio, chunk
        out = out.permute(0, 3, 1, 2)
        return out if features[0].is_contiguous(memory_format=torch.channels_last) else out.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        size, ratio, chunk = ctx.size, ctx.ratio, ctx.chunk
        rows_grad = grad.permute(0, 2, 3, 1)
        grads: list[Tensor | None] = []
        for item in ctx.plan:
            if item is None:  # no RoI on this level: no gradient (autograd reads None as zeros)
                grads.append(None)
                continue
            idx, corners, weights, inside, (n, c, h, w), dtype, channels_last = item
            total = rows_grad.new_zeros((n * h * w, c), dtype=torch.float32)
            for start in range(0, len(corners), chunk):  # chunks in RoI order: the kernel's order of additions
                part = slice(start, start + chunk)
                g = (rows_grad[part] if idx is None else rows_grad.index_select(0, idx[part])).to(torch.float32)
                # The kernel's g_k = grad * w_k / count, added corner by corner, sample by sample, bin by bin.
                contrib = g.reshape(-1, *size, 1, 1, c) * weights[part, ..., None]
                if ratio > 1:
                    contrib = contrib / float(ratio * ratio)
                contrib, flat = contrib.view(-1, c), corners[part].reshape(-1)
                if inside is not None:
                    keep = inside[part].reshape(-1)
                    contrib, flat = contrib[keep], flat[keep]
                total.index_add_(0, flat, contrib)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            grads.append(total.view(n, h, w, c).permute(0, 3, 1, 2).to(dtype, memory_format=fmt))
        ctx.plan = None
        return (None, None, None, None, None, *grads)


class ParallelRoIPool(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (levels by Detectron's FPN rule, RoIAlign with
    aligned=False), whose CPU RoIAlign runs as gathers of feature rows (a fixed sampling ratio) or
    over chunks of RoIs in parallel threads (the adaptive ratio, ``sampling_ratio <= 0``)."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        pool = _cpu_pool()
        feats = [x[name] for name in self.featmap_names]
        gather = self.sampling_ratio > 0
        if feats[0].device.type != "cpu" or (pool is None and not gather):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        if gather:
            with torch.autocast("cpu", enabled=False):  # fp32 inside, as torchvision's autocast wrapper runs it
                return _GatherRoIAlign.apply(rois.float(), self.map_levels(boxes) if len(feats) > 1 else None,
                                             tuple(self.scales), tuple(self.output_size), self.sampling_ratio, *feats)
        levels = self.map_levels(boxes) if len(feats) > 1 else torch.zeros(len(rois), dtype=torch.int64)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        workers = pool._max_workers
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            if len(idx) == 0:
                continue
            with torch.autocast("cpu", enabled=False):  # RoIAlign in fp32, as torchvision's autocast wrapper does
                pooled = _ChunkedRoIAlign.apply(feat.float(), rois[idx].float(), scale, tuple(self.output_size),
                                                self.sampling_ratio, min(workers, len(idx)))
            out[idx] = pooled.to(out.dtype)
        return out


class ParallelRPN(RegionProposalNetwork):
    """torchvision's RPN whose per-image proposal filtering (clip, small-box removal, NMS per
    level, top-k) runs for the images of a batch in parallel threads on the CPU."""

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        pool = _cpu_pool()
        if pool is None or proposals.device.type != "cpu" or proposals.shape[0] < 2:
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        n = proposals.shape[0]
        objectness = objectness.detach().reshape(n, -1)
        levels = torch.cat([torch.full((k,), i, dtype=torch.int64) for i, k in enumerate(num_anchors_per_level)])
        top = self._get_top_n_idx(objectness, num_anchors_per_level)  # per level, before NMS
        rows = torch.arange(n)[:, None]
        scores = torch.sigmoid(objectness[rows, top])
        levels = levels[None].expand(n, -1)[rows, top]
        proposals = proposals[rows, top]
        post_n = self.post_nms_top_n()

        def one_image(i: int) -> tuple[Tensor, Tensor]:
            boxes = box_ops.clip_boxes_to_image(proposals[i], image_shapes[i])
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            keep = keep[scores[i][keep] >= self.score_thresh]
            keep = keep[box_ops.batched_nms(boxes[keep], scores[i][keep], levels[i][keep], self.nms_thresh)][:post_n]
            return boxes[keep], scores[i][keep]

        results = list(pool.map(one_image, range(n)))
        return [b for b, _ in results], [s for _, s in results]
