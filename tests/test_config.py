import re

import pytest
import yaml

from scratchdet.config import Config, ConfigError, describe, from_dict, list_presets, load_config, to_dict
from scratchdet.schedule import resolve_schedule


def test_default_preset_and_overrides():
    cfg = load_config(None, ["solver.base_lr=0.01", "model.anchor_sizes=[8,16,32,64,128]", "test.eval_period=7"])
    assert cfg.solver.base_lr == 0.01
    assert cfg.model.anchor_sizes == [8, 16, 32, 64, 128]
    assert cfg.test.eval_period == 7
    assert cfg.model.norm == "GN"


@pytest.mark.parametrize("override, key", [
    ("solver.base_lrr=0.1", "solver.base_lrr"),
    ("solvr.base_lr=0.1", "solvr"),
    ("solver.max_iter=abc", "solver.max_iter"),
    ("solver.max_iter=1.5", "solver.max_iter"),
    ("model.anchor_sizes=[1,x]", "model.anchor_sizes[1]"),
    ("train.deterministic=maybe", "train.deterministic"),
    ("model.norm=LN", "model.norm"),
    ("data.multiscale=epoch", "data.multiscale"),
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_multiscale_per_batch_with_lsj_is_refused():
    with pytest.raises(ConfigError, match="data.multiscale=batch.*data.lsj"):
        load_config(None, ["data.lsj=true", "data.multiscale=batch"])


def test_frozen_bn_from_scratch_is_refused_with_reason():
    with pytest.raises(ConfigError, match="FrozenBN.*pretrained"):
        load_config(None, ["model.norm=FrozenBN"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="default"):
        load_config("no_such_preset")


def test_yaml_file_and_roundtrip(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text(yaml.safe_dump({"solver": {"ims_per_batch": 3}, "model": {"depth": 101}}))
    cfg = load_config(str(f))
    assert cfg.solver.ims_per_batch == 3 and cfg.model.depth == 101
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


def test_every_option_has_help():
    rows = describe()
    assert len(rows) > 50
    assert all(help_ for _, _, help_ in rows), [k for k, _, h in rows if not h]


@pytest.mark.parametrize("name", list_presets())
def test_presets_load(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("n", [2, 3, 6])
def test_paper_schedule_rule(n):
    cfg = load_config(f"mask_rcnn_R50_FPN_GN_scratch_{n}x")
    s = resolve_schedule(cfg.solver)
    assert s.max_iter == n * 90_000
    assert s.steps == (n * 90_000 - 60_000, n * 90_000 - 20_000)
    assert s.base_lr == pytest.approx(0.02)
    assert cfg.data.min_size_train == [800] and cfg.data.max_size_train == 1333


def test_6x_scales_linearly_to_batch_2():
    cfg = load_config("mask_rcnn_R50_FPN_GN_scratch_6x", ["solver.ims_per_batch=2"])
    s = resolve_schedule(cfg.solver)
    assert (s.max_iter, s.steps) == (540_000 * 8, (480_000 * 8, 520_000 * 8))
    assert s.base_lr == pytest.approx(0.0025)
    assert any("linear scaling" in n for n in s.notes)


def test_no_scaling_without_reference():
    s = resolve_schedule(load_config(None, ["solver.ims_per_batch=2"]).solver)
    assert s.notes == ()


# The LSJ presets (detectron2's new baselines, not the paper's grid) are checked in tests/test_keypoints.py.
# The small-data presets (the paper's re-tuned 10k-image recipe) are checked below.
PAPER = [p for p in list_presets() if p.startswith(("mask_rcnn_", "cascade_mask_rcnn_")) and "_lsj_" not in p
         and "_smalldata" not in p]


def test_preset_files_match_their_generator():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("make_presets", Path(__file__).parents[1] / "tools/make_presets.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    expected = gen.expected()
    assert sorted(expected) == PAPER
    for name, text in expected.items():
        assert (gen.CONFIGS / f"{name}.yaml").read_text() == text, name


NAME = re.compile(r"^(cascade_)?mask_rcnn_(R50|R101|X152_32x8d)_FPN_(GN|SyncBN)_(scratch|pretrained)_(\d+)x(_scaleaug)?$")


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_state_the_recipe_their_name_says(name):
    m = NAME.match(name)
    assert m, name
    cascade, backbone, norm, init, n, scaleaug = m.groups()
    cfg = load_config(name)
    assert cfg.model.norm == norm and cfg.model.depth == {"R50": 50, "R101": 101, "X152_32x8d": 152}[backbone]
    assert cfg.model.init == ("random" if init == "scratch" else "imagenet")
    # Detectron's R-*-GN ImageNet models (the GN pretrained arm) and torchvision's BN models both
    # have the stride in the 3x3 conv (Detectron's GN configs: STRIDE_1X1: False); a 1x1 stride
    # would load without complaint (same shapes) and silently handicap the pretrained arm.
    assert cfg.model.stride_in_1x1 is False
    if init == "pretrained" and norm == "GN":  # Caffe2's convention: BGR means (given here in RGB), no std
        assert cfg.model.pixel_mean == [122.7717, 115.9465, 102.9801] and cfg.model.pixel_std == [1.0, 1.0, 1.0]
    assert (cfg.solver.ims_per_batch, cfg.solver.base_lr, cfg.solver.weight_decay) == (16, 0.02, 1e-4)
    assert cfg.solver.warmup_iters > 0 and cfg.data.max_size_train == 1333 and cfg.data.flip_prob == 0.5
    assert cfg.data.min_size_train == ([640, 672, 704, 736, 768, 800] if scaleaug else [800])
    s = resolve_schedule(cfg.solver)
    total = int(n) * 90_000
    assert (s.max_iter, s.steps) == (total, (total - 60_000, total - 20_000))
    # The cascade preset is the paper's 50.9 AP system: Cascade R-CNN and Detectron's test-time augmentation.
    assert cfg.model.roi_head == ("cascade" if cascade else "standard") and cfg.test.aug == bool(cascade)
    if cascade:
        assert cfg.model.cascade_ious == [0.5, 0.6, 0.7] and cfg.model.cascade_weights == [1.0, 0.5, 0.25]
        assert cfg.test.aug_min_sizes == list(range(400, 1201, 100)) and cfg.test.aug_max_size == 2000
        assert cfg.test.aug_flip


def test_solver_help_says_whose_warmup_and_bias_decay_these_are():
    import dataclasses

    from scratchdet.config import SolverConfig

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(SolverConfig)}
    # detectron2/config/defaults.py: WARMUP_ITERS 1000, WARMUP_FACTOR 1/1000, WEIGHT_DECAY_BIAS = WEIGHT_DECAY;
    # Detectron's core/config.py: WARM_UP_ITERS 500, WARM_UP_FACTOR 1/3; its optimizer.py: biases no decay, 2x LR.
    assert "detectron2" in helps["warmup_iters"] and "500" in helps["warmup_iters"]
    assert "detectron2" in helps["warmup_factor"] and "1/3" in helps["warmup_factor"]
    assert "detectron2" in helps["weight_decay_bias"] and "doubled" in helps["weight_decay_bias"]


def test_pretrained_scale_augmented_arm_is_shipped():
    # The paper compares 9x from scratch with 6x fine-tuned, both under scale augmentation (640-800).
    for backbone in ("R50", "R101"):
        scratch = load_config(f"mask_rcnn_{backbone}_FPN_GN_scratch_9x_scaleaug")
        pretrained = load_config(f"mask_rcnn_{backbone}_FPN_GN_pretrained_6x_scaleaug")
        assert pretrained.model.init == "imagenet" and scratch.model.init == "random"
        assert pretrained.data.min_size_train == scratch.data.min_size_train == [640, 672, 704, 736, 768, 800]
        assert resolve_schedule(pretrained.solver).max_iter == 540_000


@pytest.mark.parametrize("init", ["scratch", "pretrained"])
def test_small_data_presets_state_the_papers_retuned_recipe(init, tmp_path, caplog):
    import importlib.util
    import logging
    from pathlib import Path

    from scratchdet.engine import train

    spec = importlib.util.spec_from_file_location("make_presets", Path(__file__).parents[1] / "tools/make_presets.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    name = f"mask_rcnn_R50_FPN_GN_{init}_2x_10k_smalldata"
    assert sorted(gen.smalldata_expected()) == sorted(p for p in list_presets() if "_smalldata" in p)
    assert (gen.CONFIGS / f"{name}.yaml").read_text() == gen.smalldata_expected()[name]
    cfg = load_config(name)
    # Sec. 5.2, 10k COCO images, re-tuned: scale augmentation 512-800, LR 0.04, LR decay factor 0.02.
    assert cfg.data.subset == 10_000 and cfg.data.min_size_train == list(range(512, 801, 32))
    assert (cfg.solver.base_lr, cfg.solver.gamma, cfg.solver.ims_per_batch) == (0.04, 0.02, 16)
    assert cfg.model.init == ("random" if init == "scratch" else "imagenet") and cfg.model.norm == "GN"
    # Each arm stopped at its own best: evaluated often enough to find it.
    assert 0 < cfg.test.eval_period <= 5000
    with caplog.at_level(logging.INFO, logger="scratchdet"):
        summary = train(cfg, tmp_path / "run", dry_run=True, progress=False)
    assert summary["num_classes"] == 80


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_dry_run_offline(name, tmp_path, caplog):
    import logging

    from scratchdet.engine import train

    with caplog.at_level(logging.INFO, logger="scratchdet"):
        summary = train(load_config(name), tmp_path / "run", dry_run=True, progress=False)
    assert summary["num_classes"] == 80 and summary["parameters"] == summary["trainable_parameters"]
    assert f"LR drops at {summary['steps']}" in caplog.text  # the schedule is printed
    if "pretrained" in name:
        assert "would be initialized from https://" in caplog.text  # described, not downloaded


@pytest.mark.parametrize("n, steps", [("0.5x", (30_000, 40_000)), ("1x", (60_000, 80_000)),
                                      ("4.5x", (345_000, 385_000))])
def test_fractional_schedules(n, steps):
    s = resolve_schedule(load_config(None, [f"solver.schedule={n}", "solver.ims_per_batch=16"]).solver)
    assert s.steps == steps


def test_epochs_set_iterations_and_keep_step_fractions():
    cfg = load_config(None, ["solver.epochs=12", "solver.ims_per_batch=4", "solver.max_iter=1000",
                             "solver.steps=[750,900]"])
    s = resolve_schedule(cfg.solver, num_images=1000)
    assert s.max_iter == 3000 and s.steps == (2250, 2700)
    with pytest.raises(ConfigError, match="one of them"):
        resolve_schedule(load_config(None, ["solver.epochs=1", "solver.schedule=2x"]).solver, 10)


def test_short_scratch_schedule_warns_by_how_much():
    from scratchdet.schedule import short_schedule_warning

    w = short_schedule_warning("random", 90_000 * 16)
    assert w and "1x of COCO" in w and "0.2 of that" in w
    assert short_schedule_warning("random", 6 * 90_000 * 16) is None
    assert short_schedule_warning("imagenet", 10) is None


def test_yaml_off_is_the_string_off():
    assert load_config(None, ["train.amp=off"]).train.amp == "off"


# ---- one schedule rule at any scale, the length an override gives


def test_schedule_unit_gives_the_papers_drops_at_90k_and_its_shape_at_600():
    s = resolve_schedule(load_config(None, ["solver.schedule=3x", "solver.ims_per_batch=16"]).solver)
    assert (s.max_iter, s.steps) == (270_000, (210_000, 250_000))  # Sec. 4: total-60k, total-20k
    small = resolve_schedule(load_config(None, ["solver.schedule=3x", "solver.ims_per_batch=16",
                                                "solver.schedule_unit=600", "solver.warmup_iters=10"]).solver)
    assert (small.max_iter, small.steps) == (1800, (1400, 1667))  # the same fractions of a 600-iteration unit
    # 1x and shorter keep Detectron's rule only at the paper's unit; at another unit the paper's rule holds.
    one = resolve_schedule(load_config(None, ["solver.schedule=1x", "solver.ims_per_batch=16",
                                              "solver.schedule_unit=900", "solver.warmup_iters=10"]).solver)
    assert one.steps == (300, 700)
    with pytest.raises(ConfigError, match="first LR drop"):
        resolve_schedule(load_config(None, ["solver.schedule=0.5x", "solver.ims_per_batch=16",
                                            "solver.schedule_unit=900", "solver.warmup_iters=10"]).solver)


def test_warning_fires_for_scratch_4x_not_6x_as_table_1_says():
    from scratchdet.schedule import short_schedule_warning

    # Table 1 (R50-FPN GN box AP): scratch 40.6 vs pretrained 40.9 at 4x, 41.3 vs 41.1 at 6x; Sec. 5.1:
    # scratch catches up "if a 5x or 6x schedule is used".
    w = short_schedule_warning("random", 4 * 90_000 * 16)
    assert w and "4x 40.6/40.9" in w and "6x 41.3/41.1" in w and "5x-6x" in w
    assert short_schedule_warning("random", 6 * 90_000 * 16) is None
    assert short_schedule_warning("random", 5 * 90_000 * 16) is None
    assert short_schedule_warning("imagenet", 10) is None


def test_readme_max_iter_example_moves_the_steps_inside_the_run():
    cfg = load_config(None, ["solver.max_iter=20000"])  # the README's "Your own data" example
    s = resolve_schedule(cfg.solver)
    assert s.max_iter == 20000 and s.steps == (16666, 19000) and s.warmup_iters == 1333
    assert cfg.load_notes and "moved with it" in cfg.load_notes[0]
    short = resolve_schedule(load_config(None, ["solver.max_iter=30"]).solver)
    assert short.warmup_iters <= short.steps[0] < short.max_iter
    # Steps given with the length are the user's: kept, and checked.
    kept = load_config(None, ["solver.max_iter=100", "solver.steps=[60,90]"])
    assert kept.solver.steps == [60, 90]
    from scratchdet.schedule import check_schedule

    with pytest.raises(ConfigError, match="past the end"):
        check_schedule(resolve_schedule(load_config(None, ["solver.max_iter=100", "solver.steps=[60,120]"]).solver))
    with pytest.raises(ConfigError, match="outlasts the first LR drop"):
        check_schedule(resolve_schedule(load_config(None, ["solver.max_iter=100", "solver.steps=[60,90]",
                                                           "solver.warmup_iters=70"]).solver))
    # Two lengths in a row: the second moves what the first gave.
    twice = load_config(None, ["solver.max_iter=20000", "solver.max_iter=40"])
    assert twice.solver.steps == [33, 38] and len(twice.load_notes) == 2
    assert "does not set the length" in load_config(None, ["solver.schedule=2x", "solver.max_iter=10"]).load_notes[0]


def test_given_keys_are_the_users_overrides_and_own_files(tmp_path):
    # A dry run checks the data the user named; a built-in preset's own paths are not the user's.
    assert load_config("mask_rcnn_R50_FPN_GN_scratch_3x").given_keys == frozenset()
    cfg = load_config("mask_rcnn_R50_FPN_GN_scratch_3x", ["data.train.images=x", "solver.max_iter=5"])
    assert cfg.given_keys == {"data.train.images", "solver.max_iter"}
    own = tmp_path / "mine.yaml"
    own.write_text("data:\n  train:\n    images: a\n    annotations: a.json\nsolver:\n  base_lr: 0.01\n")
    assert load_config(str(own)).given_keys == {"data.train.images", "data.train.annotations", "solver.base_lr"}


def test_a_retired_preset_says_why_and_what_instead():
    with pytest.raises(ConfigError, match="preset 'small_real' retired: measured on real sets it lost.*data.fit=true"):
        load_config("small_real")
    with pytest.raises(ConfigError, match="unknown preset 'no_such'"):
        load_config("no_such")


def test_a_config_saved_before_a_key_existed_reads_with_the_old_behaviour():
    # A run directory from before data.fit / data.multiscale existed: read back, it matches today's defaults, so a
    # resumed, branched or reported old run neither drifts from nor splits from the same run saved today.
    from scratchdet.config import flatten, without_removed

    now = flatten(to_dict(load_config(None)))
    old = {k: v for k, v in now.items() if k not in ("data.fit", "data.multiscale")}
    assert without_removed(old) == now
