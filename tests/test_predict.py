"""Reading free images (``scratchdet predict``): one reader with the dataset loader's conversions."""

import numpy as np
import pytest
from PIL import Image

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


def test_an_unfinished_runs_checkpoint_is_named_not_taken_silently(tmp_path, caplog):
    import logging

    from scratchdet.config import load_config
    from scratchdet.engine import train
    from scratchdet.run import load_run_model

    from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH

    run = tmp_path / "run"
    train(load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER), run, stop_at=3, progress=False)
    assert not (run / "model_final.pth").exists()
    with caplog.at_level(logging.INFO, logger="scratchdet"):
        load_run_model(run)
    assert "unfinished run): using model_0000003.pth, iteration 3" in caplog.text
