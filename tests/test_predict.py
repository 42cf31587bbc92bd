"""Reading free images (``scratchdet predict``): one reader with the dataset loader's conversions."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from scratchdet import data, predict
from scratchdet.data import DataError, read_image


def test_predict_reads_images_with_the_loaders_reader():
    assert predict.read_image is data.read_image


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    levels = np.array([[0, 257 * 10, 65535 // 2, 65535]], np.uint16)
    Image.fromarray(levels).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode.startswith("I")  # really stored as 16 bits
    image = read_image(tmp_path / "a.png")
    assert image.mode == "RGB"
    assert np.asarray(image)[0].tolist() == [[0] * 3, [10] * 3, [127] * 3, [255] * 3]


def test_palette_png_gives_its_colors(tmp_path):
    pixels = np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)
    Image.fromarray(pixels).convert("P").save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == "P"
    assert np.asarray(read_image(tmp_path / "a.png")).tolist() == pixels.tolist()


def test_rgba_png_drops_alpha(tmp_path):
    Image.new("RGBA", (3, 2), (10, 20, 30, 0)).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.mode == "RGB" and image.size == (3, 2)
    assert image.getpixel((2, 1)) == (10, 20, 30)


def test_exif_orientation_is_applied_to_free_images(tmp_path):
    # Stored 40x32 with a white block at the top left; orientation 6 displays it rotated 90 degrees
    # clockwise: 32x40 with the block at the top right.
    stored = Image.new("RGB", (40, 32), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "a.jpg", exif=exif, quality=100)
    image = read_image(tmp_path / "a.jpg")
    assert image.size == (32, 40)
    assert image.getpixel((31, 0)) == pytest.approx((255, 255, 255), abs=3)
    assert image.getpixel((0, 0)) == pytest.approx((0, 0, 0), abs=3)
    assert image.getpixel((0, 39)) == pytest.approx((0, 0, 0), abs=3)
    # With the JSON's size given as the stored one (COCO's convention), the stored pixels are kept.
    assert read_image(tmp_path / "a.jpg", expected_size=(40, 32)).getpixel((0, 0)) == pytest.approx((255,) * 3, abs=3)


def test_unreadable_images_are_data_errors_naming_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(DataError, match="bad.png: cannot read image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(DataError, match="gone.jpg: image file not found"):
        read_image(tmp_path / "gone.jpg")
    Image.new("RGB", (5, 4)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"a.png is 5x4 but image id 3 in x.json says 4x5"):
        read_image(tmp_path / "a.png", expected_size=(4, 5), where="image id 3 in x.json")


def test_an_unfinished_runs_checkpoint_is_named_not_taken_silently(tmp_path, caplog, monkeypatch):
    import logging

    from scratchdet.config import load_config
    from scratchdet.engine import train
    from scratchdet.run import load_run_model

    from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH, Killed, kill_after

    run = tmp_path / "run"
    kill_after(monkeypatch, 4)  # after the checkpoint at iteration 3 (solver.checkpoint_period=3)
    with pytest.raises(Killed):
        train(load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER), run, progress=False)
    assert not (run / "model_final.pth").exists()
    with caplog.at_level(logging.INFO, logger="scratchdet"):
        load_run_model(run)
    assert "unfinished run): using model_0000003.pth, iteration 3" in caplog.text


@pytest.fixture
def drawn_text(monkeypatch):
    """The strings drawn with PIL's ImageDraw.text, in order."""
    seen: list[str] = []
    text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, s, *a, **k: seen.append(s) or text(self, xy, s, *a, **k))
    return seen


def test_overlapping_instances_of_one_class_get_their_own_colours():
    pixels = torch.full((3, 200, 300), 100, dtype=torch.uint8)
    masks = torch.zeros(2, 200, 300, dtype=torch.bool)
    masks[0, 80:160, 40:160] = True
    masks[1, 110:190, 100:240] = True  # overlaps the first at rows 110-159, columns 100-159
    det = {"boxes": torch.tensor([[40.0, 80, 159, 159], [100, 110, 239, 189]]), "labels": torch.tensor([1, 1]),
           "scores": torch.tensor([0.9, 0.8]), "masks": masks}
    out = predict.draw_detections(pixels, det, ["circle"], score_thresh=0.5).int()
    first, second = out[:, 100, 60], out[:, 180, 200]  # each instance's own part
    assert first.tolist() != second.tolist()
    for got, color in ((first, predict.PALETTE[0]), (second, predict.PALETTE[1])):
        blend = [100 * (1 - predict.MASK_ALPHA) + c * predict.MASK_ALPHA for c in color]
        assert got.tolist() == pytest.approx(blend, abs=1)
    assert out[:, 130, 120].tolist() == first.tolist()  # the better-scoring instance on top where they overlap


def test_labels_sit_on_a_filled_box_sized_to_the_image(drawn_text):
    assert predict.label_font(96, 96).size == 12  # the floor
    assert predict.label_font(800, 1200).size == 20  # 1/40 of the shorter side
    # Noise: a background where bare text of any one colour would be unreadable.
    pixels = torch.randint(0, 256, (3, 800, 1200), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    det = {"boxes": torch.tensor([[100.0, 200, 300, 350]]), "labels": torch.tensor([2]), "scores": torch.tensor([0.87])}
    out = predict.draw_detections(pixels, det, ["circle", "square"], score_thresh=0.5)
    assert drawn_text == ["square 0.87"]
    left, top, right, bottom = predict.label_font(800, 1200).getbbox("square 0.87")
    pad = max(2, (bottom - top) // 5)
    label = out[:, 200 - (bottom - top + 2 * pad):200, 100:100 + right - left + 2 * pad]  # above the box's corner
    color = torch.tensor(predict.PALETTE[0]).view(3, 1, 1)
    assert label.shape[1] >= 20 and (label == color).all(0).float().mean() > 0.5  # the filled box
    assert predict.text_color(predict.PALETTE[0]) == (255, 255, 255)
    assert (label == 255).all(0).sum() > 20  # white text on it
    assert (out[:, 200:202, 100:301] == color).all()  # the box's top edge, in the instance's colour


def test_predict_names_the_checkpoints_classes_in_labels_and_json(tmp_path, caplog, drawn_text, monkeypatch):
    import logging

    from scratchdet.config import load_config
    from scratchdet.data import resolve_datasets
    from scratchdet.engine import train
    from scratchdet.run import load_run_model

    from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH, Killed, kill_after

    run = tmp_path / "run"
    cfg = load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + ["model.score_thresh_test=0.0"])
    kill_after(monkeypatch, 4)  # after the checkpoint at iteration 3 (solver.checkpoint_period=3)
    with pytest.raises(Killed):
        train(cfg, run, progress=False)
    meta = load_run_model(run)[2]
    names, label_of = meta["class_names"], {int(c): int(lab) for lab, c in meta["label_to_cat_id"].items()}
    _, (val_images, _) = resolve_datasets(cfg.data)
    with caplog.at_level(logging.INFO, logger="scratchdet"):
        written = predict.predict([val_images], run_dir=str(run), out_dir=str(tmp_path / "pred"), score_thresh=0.0,
                                  device="cpu")
    assert len(written) == 4 and "using model_0000003.pth" in caplog.text  # the checkpoint it used, logged
    results = json.loads((tmp_path / "pred" / "coco_results.json").read_text())
    assert results and all(r["category_name"] == names[label_of[r["category_id"]] - 1] for r in results)
    assert drawn_text and {t.rsplit(" ", 1)[0] for t in drawn_text} <= set(names)
