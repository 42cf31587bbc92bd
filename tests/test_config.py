import pytest
import yaml

from scratchdet.config import (
    Config,
    ConfigError,
    describe,
    from_dict,
    list_presets,
    load_config,
    resolve_schedule,
    to_dict,
)


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
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


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
