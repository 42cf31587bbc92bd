import json

import pytest

from scratchdet.synth import CLASSES, OTHER_CLASSES, generate, generate_cls


def test_other_class_set_holds_no_class_of_the_detection_set(tmp_path):
    """The ImageNet stand-in: other shapes than the detector's, balanced, with its class set recorded."""
    from torchvision.datasets import ImageFolder

    stats = generate_cls(tmp_path / "other", per_class=3, size=24, classes="other")
    folder = ImageFolder(str(tmp_path / "other"))
    assert set(folder.classes) == set(OTHER_CLASSES) and not set(folder.classes) & set(CLASSES)
    assert stats.images == 3 * len(OTHER_CLASSES) == len(folder)
    manifest = json.loads((tmp_path / "other" / "synth_cls.json").read_text())
    assert manifest["class_set"] == "other" and manifest["classes"] == list(OTHER_CLASSES)
    generate(tmp_path / "det", num_train=4, num_val=2, image_size=96)
    names = {c["name"] for c in json.loads((tmp_path / "det" / "annotations" / "instances_train.json").read_text())
             ["categories"]}
    assert names == set(CLASSES) and not names & set(folder.classes)
    with pytest.raises(ValueError, match="classes: one of target, other"):
        generate_cls(tmp_path / "x", per_class=1, classes="imagenet")


def test_draw_image_draws_the_shapes_of_the_class_set_it_is_given(monkeypatch):
    import numpy as np

    import scratchdet.synth as synth

    drawn = []
    real = synth._shape_polygons
    monkeypatch.setattr(synth, "_shape_polygons", lambda kind, *a: drawn.append(kind) or real(kind, *a))
    for seed in range(4):
        synth.draw_image(np.random.default_rng(seed), 96, OTHER_CLASSES)
    assert drawn and set(drawn) <= set(OTHER_CLASSES)
    drawn.clear()
    synth.draw_image(np.random.default_rng(0), 96)
    assert drawn and set(drawn) <= set(CLASSES)  # the detection set's default
