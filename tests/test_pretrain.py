import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scratchdet import checkpoint as ckpt
from scratchdet.config import ConfigError, load_config
from scratchdet.model import ResNet, build_model, trunk_kwargs
from scratchdet.run import NonFiniteLossError, read_metrics
from scratchdet.weights import load_backbone

from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("images_per_sec", "time_per_iter")


def _image_folder(root):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_images") / "folder"
    _image_folder(root)
    return root


def _args(folder, *extra):
    """8 images of 2 classes, batches of 4, crop 32, 3 iterations in fp32 on the CPU, a log line per iteration."""
    return TINY_MODEL + [f"pretrain.images={folder}", "pretrain.crop_size=32", "solver.ims_per_batch=4",
                         "solver.max_iter=3", "solver.warmup_iters=1", "dataloader.num_workers=0", "train.log_period=1",
                         "train.device=cpu", "train.amp=off", "train.channels_last=false", *extra]


def _pretrain(folder, run_dir, *extra, **kwargs):
    from scratchdet.pretrain import pretrain

    return pretrain(load_config(None, _args(folder, *extra)), run_dir, progress=False, **kwargs)


def test_pretrain_then_finetune_starts_from_the_pretrained_backbone(tmp_path):
    from scratchdet.engine import train
    from scratchdet.pretrain import pretrain

    _image_folder(tmp_path / "folder")
    cfg = load_config(None, TINY_MODEL + [f"pretrain.images={tmp_path / 'folder'}", "pretrain.crop_size=32",
                                          "solver.max_iter=3", "solver.ims_per_batch=4", "solver.warmup_iters=1",
                                          "dataloader.num_workers=0", "train.log_period=1", "train.device=cpu"])
    path = pretrain(cfg, tmp_path / "pre", progress=False)
    pre = read_metrics(tmp_path / "pre")
    assert pre[-1]["images_seen"] == 12 and pre[-1]["pixels_seen"] == 12 * 32 * 32
    state = torch.load(path, weights_only=True)
    # The detector built with model.init=PATH starts from exactly those weights.
    ft_cfg = load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + [f"model.init={path}", "solver.max_iter=2"])
    model = build_model(ft_cfg.model, num_classes=3)
    load_backbone(model.backbone.body, str(path), depth=18, norm="GN")
    for k, v in state["backbone"].items():
        assert torch.equal(model.backbone.body.state_dict()[k], v), k
    assert set(trunk_kwargs(ft_cfg.model)) <= {f.name for f in fields(ft_cfg.model)}
    # And a fine-tuning run records what the pre-training saw beside what it sees.
    result = train(ft_cfg, tmp_path / "ft", progress=False)
    lines = [r for r in read_metrics(tmp_path / "ft") if "loss" in r]
    assert lines[-1]["pretrain_images_seen"] == 12 and lines[-1]["images_seen"] == 4
    assert result["pretrain_pixels_seen"] == 12 * 32 * 32


# --------------------------------------------------------------------------- options


def test_the_image_stream_is_a_pure_function_of_seed_and_position(folder):
    from scratchdet.pretrain import PretrainSampler, build_dataset

    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    stream = take(PretrainSampler(8, batch_size=3, seed=5), 6)
    assert take(PretrainSampler(8, batch_size=3, seed=5, start=4), 2) == stream[4:]  # resume at iteration 4
    indices = [i for batch in stream for i, _ in batch]
    assert sorted(indices[:8]) == sorted(indices[8:16]) == list(range(8))  # each epoch: every image once
    assert indices[:8] != indices[8:16]  # ... in its own order
    assert len({s for batch in stream for _, s in batch}) == 18  # every position its own augmentation seed
    assert take(PretrainSampler(8, batch_size=3, seed=6), 1) != stream[:1]
    # An item's crop and flip come from its seed alone (any worker, any time); data.flip_prob is the flip's.
    cfg = load_config(None, _args(folder, "data.flip_prob=0"))
    plain = build_dataset(cfg)
    cfg.data.flip_prob = 1.0
    flipped = build_dataset(cfg)
    torch.manual_seed(0)
    a = plain[(3, 1234)]
    torch.manual_seed(1)
    assert torch.equal(plain[(3, 1234)][0], a[0]) and a[1] == 0
    assert torch.equal(flipped[(3, 1234)][0], a[0].flip(-1))
    assert not torch.equal(plain[(3, 1235)][0], a[0])


def test_crop_scale_sets_the_smallest_area_a_random_resized_crop_keeps(folder):
    from scratchdet.pretrain import build_dataset

    def crop(scale):
        return next(t for t in build_dataset(load_config(None, _args(folder, f"pretrain.crop_scale={scale}")))
                    .transform.transforms if type(t).__name__ == "RandomResizedCrop")

    assert crop(0.08).scale == (0.08, 1.0) and crop(0.35).scale == (0.35, 1.0)


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("off", torch.float32)])
def test_train_amp_autocasts_the_trunk(folder, tmp_path, amp, dtype):
    seen = []

    def hook(module, _inputs, output):
        if isinstance(module, ResNet):
            seen.append(output["layer4"].dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        _pretrain(folder, tmp_path / "run", f"train.amp={amp}")
    finally:
        handle.remove()
    assert seen == [dtype] * 3
    state = ckpt.load_checkpoint(tmp_path / "run" / ckpt.FINAL)
    # fp16 steps through a GradScaler (its scale is checkpointed); bf16 and fp32 need none.
    assert ("scale" in state["scaler"]) == (amp == "fp16")


def test_channels_last_and_num_threads(folder, tmp_path, monkeypatch):
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    path = _pretrain(folder, tmp_path / "run", "train.channels_last=true", "train.num_threads=1")
    weight = torch.load(path, weights_only=True)["backbone"]["layer1.0.conv1.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert threads == [1]
    path = _pretrain(folder, tmp_path / "run2")
    assert torch.load(path, weights_only=True)["backbone"]["layer1.0.conv1.weight"].is_contiguous()


def test_norm_scales_and_shifts_get_weight_decay_norm(folder, tmp_path):
    _pretrain(folder, tmp_path / "run", "solver.weight_decay=0.001", "solver.weight_decay_norm=0.5",
              "solver.weight_decay_bias=0.25")
    groups = ckpt.load_checkpoint(tmp_path / "run" / ckpt.FINAL)["optimizer"]["param_groups"]
    trunk = ResNet(**trunk_kwargs(load_config(None, _args(folder)).model))
    norms = sum(len(list(m.parameters())) for m in trunk.modules() if isinstance(m, torch.nn.GroupNorm))
    convs = sum(1 for m in trunk.modules() if isinstance(m, torch.nn.Conv2d))
    # Every GN scale and shift, the convs' and the fc's weights, the fc's bias.
    assert {g["name"]: (g["weight_decay"], len(g["params"])) for g in groups} == {
        "norm": (0.5, norms), "weight": (0.001, convs + 1), "bias": (0.25, 1)}


def test_epochs_and_reference_batch_size(folder, tmp_path):
    _pretrain(folder, tmp_path / "epochs", "solver.epochs=2")  # 2 passes over 8 images, 4 at a time
    last = read_metrics(tmp_path / "epochs")[-1]
    assert (last["iteration"], last["images_seen"], last["pixels_seen"]) == (4, 16, 16 * 32 * 32)
    # Stated at 8 images per batch, run at 4: half the LR, twice the iterations and warmup.
    _pretrain(folder, tmp_path / "scaled", "solver.reference_batch_size=8", "solver.base_lr=0.1",
              "pretrain.lr_schedule=step", "solver.steps=[2]", "solver.warmup_iters=0")
    lines = read_metrics(tmp_path / "scaled")
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in lines] == pytest.approx([0.05] * 4 + [0.005] * 2)


@pytest.mark.parametrize("override, message", [
    ("solver.schedule=6x", r"solver.schedule='6x': the paper's Nx schedule is defined for detection training .* "
                           r"solver.max_iter \(iterations\) or solver.epochs"),
    ("model.init=imagenet", r"model.init='imagenet': pretrain trains the trunk from random initialization"),
    ("pretrain.lr_schedule=linear", r"pretrain.lr_schedule: 'linear' is not one of cosine, step"),
    ("model.num_classes=5", r"model.num_classes=5, but .* has 2 class folders"),
    ("solver.checkpoint_period=0", r"solver.checkpoint_period: must be at least 1"),
    ("pretrain.crop_scale=0", r"pretrain.crop_scale: an area fraction in \(0, 1\], got 0"),
])
def test_options_without_a_meaning_for_pretraining_are_refused(folder, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _pretrain(folder, tmp_path / "run", override)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_nonfinite_steps_are_skipped_up_to_skip_nonfinite(folder, tmp_path):
    # A zero pixel std makes every input infinite, so every loss NaN.
    nan = "model.pixel_std=[0,0,0]"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss_cls at pretrain iteration 0 .*skip_nonfinite=0"):
        _pretrain(folder, tmp_path / "stop", nan)
    assert not (tmp_path / "stop" / "backbone_final.pth").exists()
    _pretrain(folder, tmp_path / "skip", nan, "solver.skip_nonfinite=3")
    last = read_metrics(tmp_path / "skip")[-1]
    assert last["skipped_steps"] == 3 and "loss" not in last


# --------------------------------------------------------------------------- checkpoints and resume


def test_checkpoints_are_written_pruned_and_hold_the_training_state(folder, tmp_path):
    run = tmp_path / "run"
    _pretrain(folder, run, "solver.max_iter=7", "solver.checkpoint_period=2", "solver.keep_checkpoints=2")
    assert [i for i, _ in ckpt.periodic_checkpoints(run)] == [4, 6]
    assert all(ckpt.verify(p) is None for p in [run / "model_0000004.pth", run / "model_0000006.pth", run / ckpt.FINAL])
    state = ckpt.load_checkpoint(run / "model_0000006.pth")
    assert state["iteration"] == 6 and state["seen"] == {"images_seen": 24, "pixels_seen": 24 * 32 * 32}
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config", "meta"} <= set(state)
    assert "trunk.conv1.weight" in state["model"] and "fc.weight" in state["model"]  # the whole classifier
    assert state["scheduler"]["last_epoch"] == 6
    assert state["meta"]["format"] == "scratchdet-pretrain" and state["meta"]["classes"] == ["a", "b"]
    # The run folder as model.init: its final backbone (model_final.pth), not an older checkpoint.
    trunk = ResNet(**trunk_kwargs(load_config(None, _args(folder)).model))
    meta = load_backbone(trunk, str(run), depth=18, norm="GN")
    final = torch.load(run / "backbone_final.pth", weights_only=True)["backbone"]
    assert all(torch.equal(trunk.state_dict()[k], v) for k, v in final.items())
    assert meta["seen"]["images_seen"] == 28


def test_a_finished_run_is_kept_and_resume_says_so(folder, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="scratchdet"):
        _pretrain(folder, run, resume=True)
    assert "--resume: no checkpoint" in caplog.text and (run / "backbone_final.pth").exists()
    with pytest.raises(FileExistsError, match="already holds a run; use --resume"):
        _pretrain(folder, run)
    with pytest.raises(FileExistsError, match=r"holds a finished run \(model_final.pth\); use --force"):
        _pretrain(folder, run, resume=True)
    _pretrain(folder, run, "solver.max_iter=1", force=True)
    assert [r["iteration"] for r in read_metrics(run)] == [1]


# 40 iterations (long enough for a signal to land before the end), a checkpoint every 4, a log line
# every 3 (so a checkpoint can fall inside a log window), channels-last; the reference loads in the main
# process, the interrupted runs in a worker: the stream does not depend on it.
CLI_ARGS = ["solver.max_iter=40", "solver.checkpoint_period=4", "solver.keep_checkpoints=0", "train.log_period=3",
            "train.channels_last=true"]


def _cli(folder, run_dir, *extra):
    cmd = [sys.executable, "-m", "scratchdet.cli", "pretrain", "--no-progress", *extra]
    if "--resume" not in extra:
        cmd += [*_args(folder, *CLI_ARGS), "--out", str(run_dir)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _kill_after(folder, run_dir, marker, sig):
    proc = _cli(folder, run_dir, "dataloader.num_workers=1")
    deadline = time.time() + 300
    while not (run_dir / marker).exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    return _finish(proc)


def _same_backbone(a, b):
    sa = torch.load(a / "backbone_final.pth", weights_only=True)["backbone"]
    sb = torch.load(b / "backbone_final.pth", weights_only=True)["backbone"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrain_reference") / "run"
    code, out = _finish(_cli(folder, run))
    assert code == 0, out
    return run


def test_sigkill_then_resume_is_bitwise_identical(folder, reference, tmp_path):
    run = tmp_path / "run"
    code, out = _kill_after(folder, run, "model_0000004.pth.sha256", signal.SIGKILL)
    assert code == -signal.SIGKILL, out
    assert not (run / "backbone_final.pth").exists()
    code, out = _finish(_cli(folder, run, "--resume", str(run)))
    assert code == 0, out
    m = re.search(r"resumed from model_(\d{7})\.pth at iteration (\d+)", out)
    assert m and int(m.group(1)) == int(m.group(2)) >= 4, out
    assert _same_backbone(reference, run)
    assert _metrics(run) == _metrics(reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_checkpoints_and_exits_nonzero(folder, reference, tmp_path, sig):
    run = tmp_path / "run"
    code, out = _kill_after(folder, run, "model_0000004.pth.sha256", sig)
    assert code != 0
    m = re.search(rf"received signal {int(sig)}: checkpoint written at iteration (\d+); continue with: scratchdet "
                  r"pretrain --resume", out)
    assert m, out
    n = int(m.group(1))
    assert ckpt.verify(run / f"model_{n:07d}.pth") is None and not (run / "backbone_final.pth").exists()
    code, out = _finish(_cli(folder, run, "--resume", str(run)))
    assert code == 0, out
    assert f"resumed from model_{n:07d}.pth at iteration {n}" in out
    assert _same_backbone(reference, run)
    assert _metrics(run) == _metrics(reference)


def test_gradient_clipping_bounds_the_first_pretraining_step(folder, tmp_path):
    # As for detection: one step from the same initial weights moves them by at most LR x clip_value.
    def weights(run):
        state = torch.load(run / "backbone_final.pth", weights_only=True)["backbone"]
        return torch.cat([v.flatten().float() for k, v in sorted(state.items()) if v.is_floating_point()])

    one = ["solver.max_iter=1", "solver.warmup_iters=0", "solver.weight_decay=0", "solver.weight_decay_norm=0",
           "solver.weight_decay_bias=0"]
    _pretrain(folder, tmp_path / "init", *one, "solver.base_lr=0")
    _pretrain(folder, tmp_path / "free", *one, "solver.base_lr=0.5")
    _pretrain(folder, tmp_path / "norm", *one, "solver.base_lr=0.5", "solver.clip_gradients=norm",
              "solver.clip_value=0.001")
    w0 = weights(tmp_path / "init")
    clipped = torch.linalg.vector_norm(weights(tmp_path / "norm") - w0).item()
    assert 0 < clipped <= 0.5 * 0.001 * (1 + 1e-3)  # the trunk's share of the clipped step
    assert torch.linalg.vector_norm(weights(tmp_path / "free") - w0).item() > 10 * clipped
