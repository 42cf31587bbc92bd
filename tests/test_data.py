import itertools
import json
from fractions import Fraction

import numpy as np
import pytest
import torch

from scratchdet.data import (
    CocoDetection,
    DataError,
    ResizeShortestEdge,
    TrainSampler,
    build_lsj_transforms,
    build_transforms,
    check_categories,
    load_coco_json,
)
from scratchdet.synth import CLASSES, MAX_SIZE, MIN_SIZE, generate


def _tiny_train(tiny_coco, **kw):
    return CocoDetection(images=tiny_coco / "train2017", annotations=tiny_coco / "annotations/instances_train2017.json",
                         **kw)


def test_coco_categories_are_mapped_contiguously_and_back(tiny_coco):
    ds = _tiny_train(tiny_coco)
    assert ds.num_classes == 80
    cat_ids = sorted(ds.cat_id_to_label)
    assert cat_ids[-1] == 90  # COCO's ids are not contiguous ...
    assert sorted(ds.cat_id_to_label.values()) == list(range(1, 81))  # ... the model's labels are
    assert all(ds.label_to_cat_id[ds.cat_id_to_label[c]] == c for c in cat_ids)
    assert ds.class_names[0] == "person"


def test_crowd_annotations_are_kept_out_of_targets(tiny_coco):
    ds = _tiny_train(tiny_coco)
    crowd_images = [i for i, r in enumerate(ds.records) if any(a.get("iscrowd") for a in r.anns)]
    assert crowd_images, "tiny_coco has crowd RLE annotations"
    i = crowd_images[0]
    rec = ds.records[i]
    _, target = ds[i]
    assert len(target["labels"]) == sum(not a.get("iscrowd") for a in rec.anns)
    assert target["masks"].shape[0] == len(target["boxes"]) == len(target["labels"])


def test_polygon_masks_match_boxes(tiny_coco):
    ds = _tiny_train(tiny_coco)
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    h, w = image.shape[-2:]
    assert target["orig_size"] == (h, w)
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert len(xs) > 0
        # The decoded mask lies inside its (rounded) box.
        assert xs.min() >= box[0].floor() - 1 and xs.max() <= box[2].ceil() + 1
        assert ys.min() >= box[1].floor() - 1 and ys.max() <= box[3].ceil() + 1


def test_filter_empty_counts_and_reports(tiny_coco):
    ds = _tiny_train(tiny_coco, filter_empty=True)
    assert len(ds) == 49  # the README: one train image has no annotations
    assert "without annotations" in ds.report.summary()


CLIPPED = "bboxes clipped to the image (repaired)"


def test_clipped_boxes_counted_only_where_they_stick_out(tiny_coco):
    path = tiny_coco / "annotations/instances_train2017.json"
    # Exact decimal arithmetic on the JSON's numbers, independent of the loader's floats.
    data = json.loads(path.read_text(), parse_float=Fraction)
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    sticking_out = 0
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        sticking_out += x < 0 or y < 0 or x + w > width or y + h > height
    _, _, report = load_coco_json(path)
    assert sticking_out == 0  # COCO's boxes lie inside their images ...
    assert report.skipped[CLIPPED] == sticking_out  # ... so nothing was repaired


def test_clipped_box_repaired_and_inside_box_untouched(tmp_path):
    image = {"id": 1, "file_name": "a.png", "height": 32, "width": 40}
    square = [[4, 4, 20, 4, 20, 20, 4, 20]]
    # 12.5 + 7.45 - 12.5 != 7.45 in floating point, though the box lies inside the image.
    inside = [12.5, 2.7, 7.45, 26.6]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [-4.25, 4, 50, 16], "segmentation": square},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": inside, "segmentation": square}]
    f = tmp_path / "ann.json"
    f.write_text(json.dumps({"images": [image], "annotations": anns, "categories": [{"id": 1}]}))
    records, _, report = load_coco_json(f)
    assert dict(report.skipped) == {CLIPPED: 1}
    assert [a["bbox"] for a in records[0].anns] == [[0, 4, 40, 16], inside]


def test_check_categories_compares_ids_with_the_training_map(tiny_coco, tmp_path):
    train = CocoDetection(images=tiny_coco / "train2017", annotations=tiny_coco / "annotations/instances_train2017.json")
    val = tiny_coco / "annotations/instances_val2017.json"
    check_categories(train.label_to_cat_id, val)  # COCO's val file has the same 80 categories
    data = json.loads(val.read_text())
    data["categories"] = [dict(c, name=c["name"].upper()) for c in reversed(data["categories"])]
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(data))
    check_categories(train.label_to_cat_id, renamed)  # ids decide, not order or names
    data["categories"] = [c for c in data["categories"] if c["id"] not in (1, 90)] + [{"id": 91, "name": "x"}]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"other\.json: test set .*only in the training set: \[1, 90\].*: \[91\]"):
        check_categories(train.label_to_cat_id, other, what="test set")
    with pytest.raises(DataError, match="nope.json"):
        check_categories(train.label_to_cat_id, tmp_path / "nope.json")
    other.write_text(json.dumps({"categories": [{"id": "1"}]}))
    with pytest.raises(DataError, match="other.json: category .* integer 'id'"):
        check_categories(train.label_to_cat_id, other)


def test_resize_shortest_edge_with_cap():
    t = ResizeShortestEdge([100], 150)
    assert t(torch.zeros(3, 50, 200, dtype=torch.uint8)).shape[-2:] == (38, 150)
    assert t(torch.zeros(3, 80, 60, dtype=torch.uint8)).shape[-2:] == (133, 100)


def test_augmentation_is_a_function_of_the_sample_seed(tiny_coco):
    ds = _tiny_train(tiny_coco, transforms=build_transforms(train=True, min_sizes=[96, 128, 160], max_size=200,
                                                            flip_prob=0.5))
    a = ds[(3, 12345)]
    b = ds[(3, 12345)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["masks"], b[1]["masks"])
    shapes = {tuple(ds[(3, s)][0].shape) for s in range(12)}
    assert len(shapes) > 1  # multi-scale sizes are drawn


def test_flip_moves_boxes_and_masks_together(tiny_coco):
    plain = _tiny_train(tiny_coco, transforms=build_transforms(train=False, min_sizes=[128], max_size=200, flip_prob=0))
    flip = _tiny_train(tiny_coco, transforms=build_transforms(train=True, min_sizes=[128], max_size=200, flip_prob=1.0))
    (im0, t0), (im1, t1) = plain[0], flip[(0, 1)]
    w = im0.shape[-1]
    assert torch.equal(im1, im0.flip(-1))
    assert torch.allclose(t1["boxes"][:, 0], w - t0["boxes"][:, 2], atol=1e-3)
    assert torch.equal(t1["masks"], t0["masks"].flip(-1))


def test_sampler_is_deterministic_resumable_and_shardable():
    ratios = [1.5 if i % 3 else 0.7 for i in range(23)]
    full = list(itertools.islice(iter(TrainSampler(ratios, batch_size=4, seed=7)), 30))
    again = list(itertools.islice(iter(TrainSampler(ratios, batch_size=4, seed=7)), 30))
    assert full == again
    resumed = list(itertools.islice(iter(TrainSampler(ratios, batch_size=4, seed=7, start=17)), 13))
    assert resumed == full[17:]
    r0 = list(itertools.islice(iter(TrainSampler(ratios, batch_size=4, seed=7, rank=0, world_size=2)), 30))
    r1 = list(itertools.islice(iter(TrainSampler(ratios, batch_size=4, seed=7, rank=1, world_size=2)), 30))
    assert [a + b for a, b in zip(r0, r1)] == full
    other = list(itertools.islice(iter(TrainSampler(ratios, batch_size=4, seed=8)), 30))
    assert other != full


def test_sampler_groups_by_aspect_ratio_and_covers_each_epoch():
    ratios = [1.5 if i % 3 else 0.7 for i in range(24)]
    s = TrainSampler(ratios, batch_size=4, seed=0)
    batches = s.epoch_batches(0)
    grouped = [b for b in batches if len({ratios[i] >= 1 for i in b}) == 1]
    assert len(grouped) >= len(batches) - 1
    seen = sorted(i for b in batches for i in b)
    assert len(seen) >= 20 and len(set(seen)) == len(seen)


def test_sampler_draws_one_size_per_global_batch_resumably_and_for_every_rank():
    ratios = [1.0] * 24
    full = list(itertools.islice(iter(TrainSampler(ratios, batch_size=4, seed=3, sizes=[64, 96, 128])), 40))
    per_batch = [{item[2] for item in batch} for batch in full]
    assert all(len(s) == 1 for s in per_batch)  # one size for the whole batch
    assert {s.pop() for s in per_batch} == {64, 96, 128}  # and each size drawn somewhere
    # The indices and sample seeds are those of the sampler without sizes: only the size is added.
    plain = list(itertools.islice(iter(TrainSampler(ratios, batch_size=4, seed=3)), 40))
    assert [[item[:2] for item in b] for b in full] == plain
    resumed = list(itertools.islice(iter(TrainSampler(ratios, batch_size=4, seed=3, sizes=[64, 96, 128], start=23)), 17))
    assert resumed == full[23:]
    ranks = [list(itertools.islice(iter(TrainSampler(ratios, batch_size=4, seed=3, sizes=[64, 96, 128], rank=r,
                                                     world_size=2)), 40)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == full


def test_dataset_item_at_a_size_drawn_for_its_batch(tmp_path):
    generate(tmp_path, seed=0, num_train=3, num_val=1, image_size=128)
    ds = CocoDetection(images=tmp_path / "train", annotations=tmp_path / "annotations/instances_train.json",
                       transforms=build_transforms(train=True, min_sizes=[64, 96, 128], max_size=128, flip_prob=0.5))
    for size in (64, 96):
        image, target = ds[(0, 5, size)]
        assert image.shape[-2:] == (size, size) and target["masks"].shape[-2:] == (size, size)
        assert float(target["boxes"].max()) <= size
    # The flip's coin is the sample seed's first draw when the size is given: the same seed, another size, the
    # same flip (the boxes scale with the size).
    _, small = ds[(0, 5, 64)]
    _, large = ds[(0, 5, 128)]
    assert torch.allclose(small["boxes"] * 2, large["boxes"], atol=1.0)
    lsj = CocoDetection(images=tmp_path / "train", annotations=tmp_path / "annotations/instances_train.json",
                        transforms=build_lsj_transforms(size=64, scale=(0.5, 1.5), flip_prob=0.5))
    with pytest.raises(ValueError, match="per image"):
        lsj[(0, 5, 64)]


def test_sampler_with_dataset_smaller_than_a_batch():
    batch = next(iter(TrainSampler([1.0, 1.0, 0.5], batch_size=4, seed=0)))
    assert len(batch) == 4


def test_synth_dataset_meets_its_brief(tmp_path):
    stats = generate(tmp_path, seed=3, num_train=40, num_val=5, image_size=256)
    data = json.loads((tmp_path / "annotations/instances_train.json").read_text())
    assert len(data["categories"]) == len(CLASSES) >= 6
    assert stats.occluded / stats.instances >= 0.25
    extents = [max(a["bbox"][2:]) for a in data["annotations"]]
    assert min(extents) <= MIN_SIZE * 1.5 and max(extents) >= MAX_SIZE * 0.75
    used = {a["category_id"] for a in data["annotations"]}
    assert used == set(range(1, len(CLASSES) + 1))
    # Deterministic: the same seed writes the same annotations.
    generate(tmp_path / "again", seed=3, num_train=40, num_val=5, image_size=256)
    assert (tmp_path / "again/annotations/instances_train.json").read_text() == json.dumps(data)


def test_synth_masks_are_exact_and_visible_parts(tmp_path):
    generate(tmp_path, seed=0, num_train=4, num_val=1, image_size=128)
    ds = CocoDetection(images=tmp_path / "train", annotations=tmp_path / "annotations/instances_train.json")
    _, target = ds[0]
    masks = target["masks"].bool()
    # Visible masks of different instances never overlap.
    assert int(masks.sum(0).max()) <= 1
    assert torch.all(masks.flatten(1).sum(1) >= 12)


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.json"):
        load_coco_json(tmp_path / "nope.json")


def test_pixel_stats(tmp_path):
    from scratchdet.data import pixel_stats

    generate(tmp_path, seed=0, num_train=3, num_val=1, image_size=64)
    ds = CocoDetection(images=tmp_path / "train", annotations=tmp_path / "annotations/instances_train.json")
    mean, std = pixel_stats(ds)
    px = np.concatenate([np.asarray(ds.load_image(r), dtype=np.float64).reshape(-1, 3) for r in ds.records])
    assert np.allclose(mean, px.mean(0), atol=1e-2) and np.allclose(std, px.std(0), atol=1e-2)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from scratchdet.data import draw_subset  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(n=st.integers(5, 400), seed=st.integers(0, 2**31), sizes=st.lists(st.integers(1, 400), min_size=2, max_size=4))
def test_subsets_are_nested_for_a_seed(n, seed, sizes):
    ids = list(range(1000, 1000 + 3 * n, 3))
    sizes = sorted(min(s, n) for s in sizes)
    subsets = [set(draw_subset(ids, s, seed)) for s in sizes]
    for small, large, k in zip(subsets, subsets[1:], sizes):
        assert len(small) == k and small <= large


def test_subset_fraction_and_errors():
    assert len(draw_subset(list(range(50)), 0.1, 0)) == 5
    with pytest.raises(DataError, match="data.subset"):
        draw_subset(list(range(5)), 6, 0)


# ---------------------------------------------------------------- the fast pipeline against the one it replaced
# CocoDetection decodes masks from their run lengths within their extent, straight at their final size and
# orientation (DetectionTransforms.apply).  These tests hold it to the pipeline it replaced, kept here verbatim
# in substance: every mask decoded at full size by the COCO mask API, the image permuted by torch, and
# torchvision's own Compose of the same transforms under torch.manual_seed(seed).

import faster_coco_eval.core.mask as mask_utils  # noqa: E402
from faster_coco_eval.mask_api_new_cpp import toUncompressedRLE  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import tv_tensors  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from scratchdet.data import InstanceMasks  # noqa: E402


def _reference_mask(ann, h, w):
    seg = ann["segmentation"]
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        rle = mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in polys], h, w))
    else:
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
    return mask_utils.decode(rle)


def _reference_raw(ds, index):
    """Image ``index`` of ``ds`` and its target as tv_tensors, every mask decoded at full size, no transform."""
    rec = ds.records[index]
    image = tv_tensors.Image(torch.from_numpy(np.array(ds.load_image(rec))).permute(2, 0, 1).contiguous())
    anns = [a for a in rec.anns if not a.get("iscrowd", 0)]
    h, w = rec.height, rec.width
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    masks = np.stack([_reference_mask(a, h, w) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
              "labels": torch.tensor([ds.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
              "masks": tv_tensors.Mask(torch.from_numpy(masks))}
    return image, target


def _reference_apply(image, target, ops, seed):
    """``v2.Compose(ops)`` on the sample under ``seed`` (the global RNG left as it was); plain tensors out."""
    if ops:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image, target = v2.Compose(ops)(image, target)
    return image.as_subclass(torch.Tensor), {k: target[k].as_subclass(torch.Tensor) for k in ("boxes", "labels", "masks")}


def _reference_item(ds, key, transform_args):
    """The sample as the previous CocoDetection.__getitem__ made it (transform_args: build_transforms' arguments)."""
    index, seed = key if isinstance(key, tuple) else (key, None)
    image, target = _reference_raw(ds, index)
    ops = []
    if transform_args is not None:
        ops = [ResizeShortestEdge(transform_args["min_sizes"], transform_args["max_size"])]
        if transform_args["train"] and transform_args["flip_prob"] > 0:
            ops.append(v2.RandomHorizontalFlip(transform_args["flip_prob"]))
        ops.append(v2.SanitizeBoundingBoxes(min_size=1))
    return _reference_apply(image, target, ops, seed if seed is not None else 0)


def _assert_same_as_reference(ds, keys, transform_args):
    """Every key's sample is the reference's bit for bit; returns (instances in, instances out) over the keys."""
    before = after = 0
    for key in keys:
        image, target = ds[key]
        ref_image, ref = _reference_item(ds, key, transform_args)
        where = f"sample {key} of {ds.annotations.name} with {transform_args}"
        assert image.dtype == ref_image.dtype == torch.uint8 and image.is_contiguous(), where
        assert torch.equal(image, ref_image), where
        for k in ("boxes", "labels", "masks"):
            assert target[k].dtype == ref[k].dtype and target[k].shape == ref[k].shape, (where, k)
            assert torch.equal(target[k], ref[k]), (where, k)
        index = key[0] if isinstance(key, tuple) else key
        before += sum(not a.get("iscrowd", 0) for a in ds.records[index].anns)
        after += len(target["labels"])
    return before, after


def _seeded_keys(n, salt=0):
    return [(i, int(s)) for i, s in enumerate(np.random.SeedSequence(salt).generate_state(n))]


@pytest.mark.parametrize("transform_args", [
    dict(train=True, min_sizes=[128], max_size=128, flip_prob=0.5),  # the size kept: flipped before the tensor
    dict(train=True, min_sizes=[96, 112, 160, 200], max_size=333, flip_prob=0.5),  # resized down and up, then flipped
])
def test_pipeline_matches_previous_on_synthetic_data(tmp_path, transform_args):
    generate(tmp_path, seed=1, num_train=16, num_val=1, image_size=128)  # compressed-RLE masks
    ds = CocoDetection(images=tmp_path / "train", annotations=tmp_path / "annotations/instances_train.json",
                       filter_empty=True, transforms=build_transforms(**transform_args))
    _assert_same_as_reference(ds, _seeded_keys(len(ds)) + _seeded_keys(len(ds), salt=1), transform_args)


@pytest.mark.parametrize("transform_args", [
    dict(train=True, min_sizes=[640, 672, 704, 736, 768, 800], max_size=1333, flip_prob=0.5),  # the paper's scale jitter
    dict(train=True, min_sizes=[64, 96], max_size=120, flip_prob=0.5),  # small: sanitizing drops boxes and their masks
    dict(train=False, min_sizes=[800], max_size=1333, flip_prob=0.0),  # the evaluation transform
    None,
])
def test_pipeline_matches_previous_on_tiny_coco(tiny_coco, transform_args):
    ds = _tiny_train(tiny_coco, transforms=build_transforms(**transform_args) if transform_args else None)
    keys = _seeded_keys(len(ds)) if transform_args and transform_args["train"] else list(range(len(ds)))
    before, after = _assert_same_as_reference(ds, keys, transform_args)
    if transform_args and transform_args["max_size"] < 200:
        assert after < before  # the comparison covered instances left out by SanitizeBoundingBoxes


def test_pipeline_matches_previous_on_every_segmentation_form(tmp_path):
    # An odd-sized image; uncompressed and compressed RLE, multi-part polygons, a polygon reaching out of the
    # image, masks on the image's borders, a run crossing columns (a full-height bar) and a one-pixel-wide box.
    h, w = 37, 53
    bar = np.zeros((h, w), np.uint8)
    bar[:, 10:14] = 1
    edge = np.zeros((h, w), np.uint8)
    edge[30:, 45:] = 1
    edge[0, 0] = 1
    rle_str = mask_utils.encode(np.asfortranarray(edge))
    rle_str["counts"] = rle_str["counts"].decode("ascii")
    rle_list = toUncompressedRLE(mask_utils.frPyObjects([[2, 2, 20, 3, 15, 25, 3, 20]], h, w))[0]
    bar_rle = toUncompressedRLE([mask_utils.encode(np.asfortranarray(bar))])[0]
    segs = [
        ([[5, 5, 25, 5, 25, 20, 5, 20], [30, 2, 50, 2, 40, 30]], [5, 2, 45, 28]),
        ([[-10, -10, 60, -5, 20, 50]], [0, 0, 53, 37]),
        ({"size": [h, w], "counts": rle_list["counts"]}, [2, 2, 18, 23]),
        ({"size": [h, w], "counts": bar_rle["counts"]}, [10, 0, 4, 37]),
        (rle_str, [0, 0, 53, 37]),
        ([[20.2, 3, 21.1, 3, 21.1, 30, 20.2, 30]], [20.2, 3, 0.9, 27]),
    ]
    anns = [{"id": k + 1, "image_id": 1, "category_id": 3 + 4 * (k % 2), "segmentation": s, "bbox": b, "iscrowd": 0,
             "area": 1.0} for k, (s, b) in enumerate(segs)]
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    f = tmp_path / "ann.json"
    f.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}], "annotations": anns,
                             "categories": [{"id": 3}, {"id": 7}]}))
    for sizes, max_size in (([37], 53), ([16, 20, 29, 37, 50, 74, 75, 111], 200), ([8], 9)):
        args = dict(train=True, min_sizes=sizes, max_size=max_size, flip_prob=0.5)
        ds = CocoDetection(images=tmp_path / "img", annotations=f, transforms=build_transforms(**args))
        assert len(ds.records[0].anns) == len(segs)
        _assert_same_as_reference(ds, [(0, s) for s in range(40)], args)


def test_instance_masks_render_is_a_gather_of_the_decoded_masks():
    # render(rows, cols, keep)[k] == mask[keep[k]][rows][:, cols] for monotone maps, forward or reversed.
    rng = np.random.default_rng(0)
    for _ in range(150):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        full = (rng.random((int(rng.integers(0, 5)), h, w)) < rng.random()).astype(np.uint8)
        full[:, : int(rng.integers(0, h + 1))] *= rng.random() < 0.5  # some masks empty in part, some entirely
        runs = [np.asarray(toUncompressedRLE([mask_utils.encode(np.asfortranarray(m))])[0]["counts"]) for m in full]
        masks = InstanceMasks(runs, h, w)
        rows = np.sort(rng.integers(0, h, int(rng.integers(1, 60)))) if rng.random() < 0.7 else None
        cols = np.sort(rng.integers(0, w, int(rng.integers(1, 60)))) if rng.random() < 0.7 else None
        if cols is not None and rng.random() < 0.5:
            cols = cols[::-1]
        keep = sorted(rng.choice(len(full), int(rng.integers(0, len(full) + 1)), replace=False).tolist())
        expected = full[keep][:, slice(None) if rows is None else rows][:, :, slice(None) if cols is None else cols]
        np.testing.assert_array_equal(masks.render(rows, cols, keep), expected)


def test_sample_rng_is_restored_and_accelerators_untouched(tiny_coco, monkeypatch):
    ds = _tiny_train(tiny_coco, transforms=build_transforms(train=True, min_sizes=[96, 128], max_size=200,
                                                            flip_prob=0.5))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("the sample seeded CUDA's RNG"))
    state = torch.get_rng_state()
    ds[(0, 5)]
    assert torch.equal(torch.get_rng_state(), state)


def test_check_image_reads_the_header_and_names_the_file_and_image_id(tmp_path):
    from PIL import Image

    from scratchdet.data import check_image

    where = "image id 7 in ann.json"
    Image.new("RGB", (40, 32)).save(tmp_path / "good.jpg")
    check_image(tmp_path / "good.jpg", expected_size=(40, 32), where=where)
    (tmp_path / "text.jpg").write_text("not a JPEG, a text file\n")
    with pytest.raises(DataError, match=r"text\.jpg: cannot read image id 7 in ann\.json"):
        check_image(tmp_path / "text.jpg", expected_size=(40, 32), where=where)
    # A PNG cut short opens (its header is whole); PIL's verify finds the missing chunks without decoding.
    Image.new("RGB", (40, 32)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
    with pytest.raises(DataError, match=r"cut\.png: cannot read image id 7 in ann\.json"):
        check_image(tmp_path / "cut.png", expected_size=(40, 32), where=where)
    with pytest.raises(DataError, match=r"good\.jpg is 40x32 but image id 7 in ann\.json says 41x32"):
        check_image(tmp_path / "good.jpg", expected_size=(41, 32), where=where)
    with pytest.raises(DataError, match=r"nope\.jpg: image file not found \(image id 7"):
        check_image(tmp_path / "nope.jpg", expected_size=(40, 32), where=where)
    # Stored sideways with an EXIF orientation, annotated upright: fits, as read_image turns it.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 32)).save(tmp_path / "turned.jpg", exif=exif)
    check_image(tmp_path / "turned.jpg", expected_size=(32, 40), where=where)


def _records(sizes, box_side):
    from types import SimpleNamespace

    from scratchdet.data import ImageRecord

    recs = [ImageRecord(i, f"{i}.jpg", h, w, [{"bbox": [0, 0, box_side, box_side], "iscrowd": 0}])
            for i, (w, h) in enumerate(sizes)]
    return SimpleNamespace(records=recs)


def test_input_size_report_warns_where_images_shrink_or_boxes_miss_the_anchors():
    from scratchdet.data import input_size_report

    photos = _records([(640, 480)] * 3, 100)
    summary, warnings = input_size_report(photos, min_sizes=[256], max_size=256, anchor_sizes=[12, 24, 48, 96, 192])
    assert "resized x0.40 on median" in summary and "median 40 px" in summary
    assert len(warnings) == 1 and "shrunk 2.5x" in warnings[0] and "data.min_size_train" in warnings[0]
    # At 512-640 (the middle size, 576, is drawn on median) the photos are enlarged, not shrunk: no warning.
    assert input_size_report(photos, min_sizes=[512, 576, 640], max_size=1066,
                             anchor_sizes=[32, 64, 128, 256, 512])[1] == []
    # 4 px boxes against anchors from 32 px: under half the smallest anchor, all of them.
    small = _records([(640, 480)] * 3, 4)
    _, warnings = input_size_report(small, min_sizes=[480], max_size=640, anchor_sizes=[32, 64, 128, 256, 512])
    assert "100% of the 3 training boxes are under 16 px" in warnings[0]
    assert "model.anchor_sizes (now [32, 64, 128, 256, 512])" in warnings[0]
    assert "shrink under 8 px" in warnings[1] and "the anchors cover 0%" in warnings[2] and len(warnings) == 3
    # Large scale jitter at its mean factor: a 1024 px square x 1.05 fits the 640 px side to 1075 px.
    summary, _ = input_size_report(photos, min_sizes=[800], max_size=1333, anchor_sizes=[32, 64, 128, 256, 512],
                                   lsj_size=1024, lsj_scale=[0.1, 2.0])
    assert "resized x1.68 on median" in summary


@pytest.mark.parametrize("side, expect", [
    (6, ["smaller than the smallest anchor", "shrink under 8 px", "the anchors cover 0%"]),  # tiny: nuclei at 256 px
    (10, ["smaller than the smallest anchor"]),  # under the smallest anchor, over 8 px, covered (IoU 0.69)
    (40, []),  # inside the anchors' span
    (600, ["outside the anchors' reach", "the anchors cover 0%"]),  # over twice the largest anchor
])
def test_tiny_and_large_boxes_are_warned_about_naming_the_setting(side, expect):
    from scratchdet.data import input_size_report

    summary, warnings = input_size_report(_records([(640, 640)] * 4, side), min_sizes=[640], max_size=640,
                                          anchor_sizes=[12, 24, 48, 96, 192])
    assert len(warnings) == len(expect) and all(e in w for e, w in zip(expect, warnings)), warnings
    assert "cover" in summary
    for w in warnings:
        assert "model.anchor_sizes" in w or "data.min_size_train" in w


def test_anchor_coverage_in_the_rpns_terms():
    from scratchdet.data import anchor_coverage

    sizes = [12, 24, 48, 96, 192]
    # A square half-way (geometrically) between two anchor sizes overlaps each by IoU 1/2: covered, just.
    assert anchor_coverage(np.array([[24 * 2 ** 0.5] * 2]), sizes)[0] == pytest.approx(0.5)
    assert anchor_coverage(np.array([[48.0, 48.0]]), sizes)[0] == pytest.approx(1.0)
    # A 1:2 box meets its own aspect ratio (torchvision: h/w = ratio) exactly; a 1:8 sliver is not covered.
    assert anchor_coverage(np.array([[48 / 2 ** 0.5, 48 * 2 ** 0.5]]), sizes)[0] == pytest.approx(1.0)
    assert anchor_coverage(np.array([[12.0, 96.0]]), sizes)[0] < 0.5
    assert anchor_coverage(np.array([[4.0, 4.0]]), sizes)[0] == pytest.approx(16 / 144)
