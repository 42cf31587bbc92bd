import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchdet.config import load_config
from scratchdet.engine import train
from scratchdet.evaluation import STAT_NAMES
from scratchdet.run import NonFiniteLossError, read_metrics

from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH


def _cfg(*extra):
    return load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + list(extra))


@pytest.mark.parametrize("per", ["batch", "image"])
def test_multiscale_sizes_are_drawn_per_batch_or_per_image(tmp_path, per):
    # pixels_seen counts each image at its training size: with sizes drawn per batch every step adds
    # 2 x size^2 (one size for both images), per image some steps mix the two sizes.
    run = tmp_path / per
    train(_cfg("data.min_size_train=[64,96]", f"data.multiscale={per}", "train.log_period=1", "solver.max_iter=8",
               "solver.checkpoint_period=8"), run, progress=False)
    seen = [0] + [r["pixels_seen"] for r in read_metrics(run) if "loss" in r]
    steps = {b - a for a, b in zip(seen, seen[1:])}
    if per == "batch":
        assert steps == {2 * 64 * 64, 2 * 96 * 96}
    else:
        assert 64 * 64 + 96 * 96 in steps


def test_train_evaluate_synthetic_end_to_end(tmp_path):
    run = tmp_path / "run"
    result = train(_cfg("test.eval_period=3"), run, progress=False)
    for name in ("config.yaml", "env.json", "metrics.jsonl", "log.txt", "model_final.pth", "model_final.pth.sha256",
                 "model_0000003.pth", "final.json", "coco_instances_results.json"):
        assert (run / name).is_file(), name
    records = read_metrics(run)
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "bbox/AP" in r]
    assert [r["iteration"] for r in train_lines] == [2, 4, 6]
    assert [r["iteration"] for r in eval_lines] == [3, 6]
    for t in ("bbox", "segm"):
        assert all(f"{t}/{k}" in eval_lines[-1] for k in STAT_NAMES)
    assert all(k in train_lines[0] for k in ("lr", "images_per_sec", "loss_mask", "images_seen", "pixels_seen"))
    assert train_lines[-1]["images_seen"] == 12
    assert result["segm/AP"] == eval_lines[-1]["segm/AP"]
    state = torch.load(run / "model_final.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "iteration", "rng"} <= set(state)
    assert state["iteration"] == 6
    # The resolved config is in the run directory and rebuilds the same config.
    import yaml

    from scratchdet.config import from_dict

    assert from_dict(yaml.safe_load((run / "config.yaml").read_text())) == _cfg("test.eval_period=3")


def test_train_on_tiny_coco_writes_coco_category_ids(tiny_coco, tmp_path):
    cfg = load_config(None, TINY_MODEL + TINY_SOLVER + [
        f"data.train.images={tiny_coco / 'train2017'}",
        f"data.train.annotations={tiny_coco / 'annotations/instances_train2017.json'}",
        f"data.val.images={tiny_coco / 'val2017'}",
        f"data.val.annotations={tiny_coco / 'annotations/instances_val2017.json'}",
        "data.min_size_train=[128]", "data.max_size_train=192", "data.min_size_test=128", "data.max_size_test=192",
        "model.score_thresh_test=0.0", "solver.max_iter=4", "solver.steps=[3]", "test.max_images=8", "test.ims_per_batch=2",
    ])
    result = train(cfg, tmp_path / "run", progress=False)
    assert 0 <= result["bbox/AP"] <= 100 and 0 <= result["segm/AP"] <= 100
    results = json.loads((tmp_path / "run/coco_instances_results.json").read_text())
    gt = json.loads((tiny_coco / "annotations/instances_val2017.json").read_text())
    coco_ids = {c["id"] for c in gt["categories"]}
    val_image_ids = {im["id"] for im in gt["images"]}
    assert results
    assert {r["category_id"] for r in results} <= coco_ids
    # COCO has no id 12 (its first gap): had labels been written unmapped, labels past 11 would give
    # ids outside COCO's set, which the subset check above would catch.
    assert max(r["category_id"] for r in results) > 12
    assert {r["image_id"] for r in results} <= val_image_ids
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    for r in results[:50]:  # masks pasted at the original image resolution
        assert tuple(r["segmentation"]["size"]) == sizes[r["image_id"]]


def test_non_finite_loss_stops_with_name_and_iteration(tmp_path):
    from scratchdet import checkpoint as ckpt

    cfg = _cfg("solver.base_lr=1e12", "solver.warmup_iters=0", "solver.max_iter=30", "solver.checkpoint_period=1",
               "solver.keep_checkpoints=0")
    with pytest.raises(NonFiniteLossError, match=r"non-finite (loss_\w+(, )?)+ at iteration \d+ \(lr ") as e:
        train(cfg, tmp_path / "run", progress=False)
    bad_iter = int(re.search(r"at iteration (\d+)", str(e.value)).group(1))
    assert not (tmp_path / "run/model_final.pth").exists()
    # The last good checkpoint stays: it verifies, it is the one just before the bad iteration, and
    # every tensor in it is finite.
    path, state = ckpt.latest_valid(tmp_path / "run")
    assert ckpt.verify(path) is None
    assert state["iteration"] == bad_iter
    tensors = list(state["model"].values()) + [t for s in state["optimizer"]["state"].values() for t in s.values()
                                               if isinstance(t, torch.Tensor)]
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors)


def test_run_directory_is_not_overwritten(tmp_path):
    cfg = _cfg("solver.max_iter=2")
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--force"):
        train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="finished"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    train(cfg, tmp_path / "run", force=True, progress=False)


def test_dry_run_describes_without_training(tmp_path):
    summary = train(load_config("mask_rcnn_R50_FPN_GN_scratch_6x"), tmp_path / "run", dry_run=True, progress=False)
    assert summary["parameters"] == summary["trainable_parameters"] > 40_000_000
    assert summary["norm_layers"] == ["FP32GroupNorm"]
    assert summary["steps"] == [480_000, 520_000] and summary["max_iter"] == 540_000
    assert not (tmp_path / "run").exists()


def test_bf16_autocast_trains_and_evaluates(tmp_path, monkeypatch):
    import scratchdet.engine as engine

    # Record the dtype the backbone's convolutions really computed in, training and evaluation alike.
    dtypes = set()
    build = engine.build_model

    def recording_build(*args, **kwargs):
        model = build(*args, **kwargs)
        model.backbone.body.layer1.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
        return model

    monkeypatch.setattr(engine, "build_model", recording_build)
    result = train(_cfg("train.amp=bf16", "solver.max_iter=4", "train.log_period=1"), tmp_path / "run",
                   progress=False)
    assert result["precision"] == "bf16" and dtypes == {torch.bfloat16}
    losses = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 4
    assert all(math.isfinite(v) for r in losses for k, v in r.items() if k.startswith("loss"))
    assert 0 <= result["segm/AP"] <= 100


def test_images_per_sec_leaves_out_evaluation_and_checkpoints(tmp_path, monkeypatch):
    # A fake clock, not the wall clock (a test bounded by wall time fails on a busy machine): every reading
    # advances it by 1 ms, and an evaluation or a checkpoint advances it by 100 s.  Had those pauses counted,
    # the windows after them would average 50 s or more per iteration; left out, under a second.
    import types

    import scratchdet.evaluation as evaluation
    import scratchdet.loop as loop
    import scratchdet.run as run

    clock = {"now": 0.0}

    def perf_counter() -> float:
        clock["now"] += 0.001
        return clock["now"]

    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=perf_counter))
    # evaluate_model is patched where it lives: evaluation.evaluate_run calls it there.
    for module, name in ((evaluation, "evaluate_model"), (run, "save_training_state")):
        slow = getattr(module, name)

        def slowed(*a, _f=slow, **k):
            clock["now"] += 100.0
            return _f(*a, **k)

        monkeypatch.setattr(module, name, slowed)
    train(_cfg("solver.max_iter=6", "train.log_period=2", "test.eval_period=2", "solver.checkpoint_period=2"),
          tmp_path / "run", progress=False)
    lines = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["iteration"] for r in lines] == [2, 4, 6]
    assert clock["now"] > 400  # the pauses did happen: 2 evaluations and 2 checkpoints inside the run
    assert all(r["time_per_iter"] < 1.0 for r in lines), lines


def test_resume_drops_a_partial_last_metrics_line(tmp_path, caplog):
    cfg = _cfg("solver.checkpoint_period=2")
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    for p in run.glob("model_final.pth*"):
        p.unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 5, "loss_class')  # a write cut by SIGKILL
    with caplog.at_level(logging.WARNING, logger="scratchdet"):
        train(cfg, run, resume=True, progress=False)
    assert "incomplete last line" in caplog.text
    records = read_metrics(run)
    assert [r["iteration"] for r in records if "loss" in r] == [2, 4, 6]


def test_force_removes_every_output_of_the_old_run(tmp_path):
    run = tmp_path / "run"
    train(_cfg("solver.max_iter=2"), run, progress=False)
    (run / "inference").mkdir()
    for stale in ("tensorboard/stale", "inference/stale", "model_0000999.pth"):
        (run / stale).write_text("old")
    (run / "notes.txt").write_text("the user's own file")
    # The new run writes no validation results (and no final evaluation): nothing of the old run's may remain.
    train(_cfg("solver.max_iter=2", "test.max_images=0", "data.val.images=", "data.val.annotations=",
               "data.train.images=" + str(_synth_train(run)[0]), "data.train.annotations=" + str(_synth_train(run)[1])),
          run, force=True, progress=False)
    for stale in ("tensorboard/stale", "inference", "model_0000999.pth", "coco_instances_results.json"):
        assert not (run / stale).exists(), stale
    assert "bbox/AP" not in json.loads((run / "final.json").read_text())
    assert (run / "notes.txt").read_text() == "the user's own file"
    assert list((run / "tensorboard").iterdir())


def _synth_train(run):
    import yaml

    from scratchdet.config import from_dict
    from scratchdet.data import resolve_datasets

    return resolve_datasets(from_dict(yaml.safe_load((run / "config.yaml").read_text())).data)[0]


def test_syncbn_in_one_process_says_so(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="scratchdet"):
        train(_cfg("model.norm=SyncBN", "solver.max_iter=1"), tmp_path / "run", progress=False)
    assert "SyncBN in a single process" in caplog.text


def test_deterministic_by_default_on_cpu_and_not_on_cuda(tmp_path):
    from scratchdet.device import seed_everything, use_deterministic

    assert load_config(None).train.deterministic == "auto"
    assert use_deterministic("auto", torch.device("cpu")) and not use_deterministic("auto", torch.device("cuda"))
    assert use_deterministic("on", torch.device("cuda")) and not use_deterministic("off", torch.device("cpu"))
    assert load_config(None, ["train.deterministic=true"]).train.deterministic == "on"
    try:
        train(_cfg("solver.max_iter=1"), tmp_path / "run", progress=False)
        assert torch.are_deterministic_algorithms_enabled()
        # auto: no NaN fill of new memory (10% of the default step); strict mode keeps it.
        assert not torch.utils.deterministic.fill_uninitialized_memory
        seed_everything(0, True, strict=True)
        assert torch.utils.deterministic.fill_uninitialized_memory
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = True  # torch's default


def test_subset_tensorboard_and_channels_last_in_a_run(tmp_path, monkeypatch):
    import scratchdet.engine as engine

    formats = []
    build = engine.build_model

    def recording_build(*args, **kwargs):
        model = build(*args, **kwargs)
        model.backbone.body.conv1.register_forward_pre_hook(
            lambda m, i: formats.append(m.weight.is_contiguous(memory_format=torch.channels_last)))
        return model

    monkeypatch.setattr(engine, "build_model", recording_build)
    run = tmp_path / "run"
    result = train(_cfg("data.subset=5", "data.subset_seed=3", "train.channels_last=true", "solver.max_iter=4",
                        "solver.ims_per_batch=2"), run, progress=False)
    assert formats and all(formats)
    # data.subset: 5 of the 12 training images, saved in the run, and the only images trained on.
    ids = json.loads((run / "subset_image_ids.json").read_text())
    assert len(ids) == 5 and result["train_images"] == 5
    from scratchdet.data import draw_subset

    assert ids == draw_subset(list(range(1, 13)), 5, 3) or len(set(ids)) == 5
    # TensorBoard receives the same scalars as metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    records = read_metrics(run)
    for key in ("loss", "lr", "segm/AP", "images_seen"):
        logged = [(r["iteration"], r[key]) for r in records if key in r]
        tb = [(e.step, e.value) for e in acc.Scalars(key)]
        assert logged and [s for s, _ in tb] == [s for s, _ in logged], key
        assert [v for _, v in tb] == pytest.approx([v for _, v in logged], rel=1e-6), key


def test_skip_nonfinite_skips_a_bounded_number_of_steps(tmp_path):
    base = ["solver.base_lr=1e12", "solver.warmup_iters=0", "solver.max_iter=6", "solver.checkpoint_period=100"]
    train(_cfg(*base, "solver.skip_nonfinite=10"), tmp_path / "a", progress=False)
    skipped = [r for r in read_metrics(tmp_path / "a") if "skipped_step" in r]
    assert skipped and all("at iteration" in r["skipped_step"] for r in skipped)
    assert (tmp_path / "a/model_final.pth").exists()
    with pytest.raises(NonFiniteLossError):
        train(_cfg(*base, "solver.skip_nonfinite=1"), tmp_path / "b", progress=False)
    assert len([r for r in read_metrics(tmp_path / "b") if "skipped_step" in r]) == 1


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-cpu", "fp32-cpu"])
def test_default_schedule_is_the_same_in_every_precision(tmp_path, monkeypatch, caplog, native_bf16):
    # One recipe, one promise: a CPU without native bf16 trains the default in fp32 with the same
    # iterations, LR drops and warmup as one with it (once it got a shorter schedule whose AP was never
    # measured), and the dry run says which precision and why.
    caps = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": native_bf16, "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    cfg = load_config("default", TINY_SYNTH + ["train.device=cpu"])
    assert cfg.train.amp == "auto"
    with caplog.at_level(logging.INFO, logger="scratchdet"):
        summary = train(cfg, tmp_path / "run", dry_run=True, progress=False)
    assert (summary["max_iter"], summary["steps"], summary["warmup_iters"]) == \
        (cfg.solver.max_iter, list(cfg.solver.steps), cfg.solver.warmup_iters)
    assert summary["precision"] == ("bf16" if native_bf16 else "fp32")
    assert f"precision: {'bf16' if native_bf16 else 'fp32'}" in caplog.text
    assert ("bf16 would be emulated" in caplog.text) == (not native_bf16)


def test_removed_fp32_cpu_scale_in_a_saved_config_is_ignored_with_a_warning(caplog):
    # A run directory written before solver.fp32_cpu_scale was removed still loads (resume, eval).
    from scratchdet.config import from_dict, to_dict

    saved = to_dict(load_config("default"))
    saved["solver"]["fp32_cpu_scale"] = 0.65
    with caplog.at_level(logging.WARNING, logger="scratchdet"):
        cfg = from_dict(saved)
    assert cfg.solver.max_iter == load_config("default").solver.max_iter
    assert "solver.fp32_cpu_scale: removed" in caplog.text


def test_the_training_step_imports_without_the_evaluation_stack():
    # The GPU machine's python lacks faster-coco-eval: the training benchmarks and what they import
    # from scratchdet (engine, data, model, ...) must load without it, and without scratchdet.evaluation.
    code = ("import sys; sys.modules['faster_coco_eval'] = None; sys.path.insert(0, 'benchmarks'); "
            "import scratchdet.engine, train_throughput, profile_train_step; "
            "assert 'scratchdet.evaluation' not in sys.modules, 'scratchdet.evaluation was imported'")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_final_evaluation_records_its_per_image_matches(tmp_path):
    """metrics.jsonl alone holds what a paired bootstrap needs: the matches give the logged AP back."""
    import json

    from scratchdet.analysis.bootstrap import ap_from_matches
    from scratchdet.config import load_config
    from scratchdet.engine import train
    from scratchdet.evaluation import matches_from_record

    from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH

    final = train(load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + ["model.score_thresh_test=0.0"]),
                  tmp_path / "run", progress=False)
    records = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (matches,) = [r for r in records if "matches" in r]
    assert matches["iteration"] == 6 and set(matches["matches"]) == {"bbox", "segm"}
    for iou_type, rec in matches["matches"].items():
        assert ap_from_matches(matches_from_record(rec)) == pytest.approx(final[f"{iou_type}/AP"], abs=1e-3)


def test_dry_run_notes_a_presets_missing_data_and_refuses_the_users(tmp_path, caplog):
    from scratchdet.data import DataError

    # A built-in preset's own COCO path, absent here: described, with the data said to be unchecked.
    with caplog.at_level(logging.INFO, logger="scratchdet"):
        summary = train(load_config("mask_rcnn_R50_FPN_GN_scratch_3x"), tmp_path / "run", dry_run=True, progress=False)
    assert summary["num_classes"] == 80
    assert "not checked: training data datasets/coco/annotations/instances_train2017.json not found" in caplog.text
    # The same preset with a path the user gave (an override, or a YAML file of their own): checked, as the run.
    typo = str(tmp_path / "instances_trian2017.json")
    with pytest.raises(DataError, match="instances_trian2017.json: annotation file not found"):
        train(load_config("mask_rcnn_R50_FPN_GN_scratch_3x", ["data.train.images=.", f"data.train.annotations={typo}"]),
              tmp_path / "run", dry_run=True, progress=False)
    own = tmp_path / "mine.yaml"
    own.write_text((Path(__file__).parents[1] / "scratchdet/configs/mask_rcnn_R50_FPN_GN_scratch_3x.yaml").read_text())
    with pytest.raises(DataError, match="datasets/coco/annotations/instances_train2017.json: annotation file not found"):
        train(load_config(str(own)), tmp_path / "run", dry_run=True, progress=False)


def test_run_logs_input_size_and_anchors(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="scratchdet"):
        train(_cfg("solver.max_iter=2", "solver.steps=[1]", "solver.warmup_iters=0", "data.min_size_train=[80,88,96]"),
              tmp_path / "run", progress=False)
    assert ("input size: training shorter side drawn per image from 3 sizes 80-96 (multi-scale, data.multiscale), "
            "longer side at most 96") in caplog.text
    assert "anchors: [12, 24, 48, 96, 192] px on P2-P6" in caplog.text
    assert "training set at the input size: images resized x0.92 on median" in caplog.text
    log_txt = (tmp_path / "run" / "log.txt").read_text()
    assert "input size: training" in log_txt and "anchors: " in log_txt


def _weights(run) -> torch.Tensor:
    state = torch.load(run / "model_final.pth", weights_only=True)["model"]
    return torch.cat([v.flatten().float() for k, v in sorted(state.items()) if v.is_floating_point()])


def test_gradient_clipping_bounds_the_first_step(tmp_path):
    # One SGD step from the same initial weights (no warmup, no weight decay, momentum buffers at zero):
    # the weights move by LR x the gradient, so with norm clipping by at most LR x clip_value.
    one = ["solver.max_iter=1", "solver.steps=[]", "solver.warmup_iters=0", "solver.weight_decay=0",
           "solver.weight_decay_norm=0", "solver.weight_decay_bias=0", "solver.checkpoint_period=100",
           "train.log_period=1"]
    train(_cfg(*one, "solver.base_lr=0"), tmp_path / "init", progress=False)
    train(_cfg(*one, "solver.base_lr=0.5"), tmp_path / "free", progress=False)
    train(_cfg(*one, "solver.base_lr=0.5", "solver.clip_gradients=norm", "solver.clip_value=0.001"),
          tmp_path / "norm", progress=False)
    train(_cfg(*one, "solver.base_lr=0.5", "solver.clip_gradients=value", "solver.clip_value=1e-5"),
          tmp_path / "value", progress=False)
    w0 = _weights(tmp_path / "init")
    free = torch.linalg.vector_norm(_weights(tmp_path / "free") - w0).item()
    clipped = torch.linalg.vector_norm(_weights(tmp_path / "norm") - w0).item()
    assert clipped == pytest.approx(0.5 * 0.001, rel=1e-3)  # the gradient's norm is far above 0.001 here
    assert free > 100 * clipped
    # Each element moved by LR x 1e-5 at most, give or take one fp32 rounding of the weight it was added to.
    moved = (_weights(tmp_path / "value") - w0).abs()
    assert (moved <= 0.5 * 1e-5 + w0.abs() * torch.finfo(torch.float32).eps).all()
