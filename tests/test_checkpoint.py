import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scratchdet import checkpoint as ckpt
from scratchdet.config import load_config
from scratchdet.engine import train
from scratchdet.run import read_metrics

from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH

ROOT = Path(__file__).resolve().parents[1]
# 10 iterations, a checkpoint every 2, logs every 3 (so a checkpoint can fall inside a log window),
# evaluation every 5, one loader worker.
RESUME_ARGS = TINY_MODEL + TINY_SYNTH + TINY_SOLVER + [
    "solver.max_iter=10", "solver.steps=[7]", "solver.checkpoint_period=2", "solver.keep_checkpoints=0",
    "train.log_period=3", "test.eval_period=5", "dataloader.num_workers=1"]
TIMING = ("images_per_sec", "time_per_iter")


def _cli(run_dir, *extra):
    cmd = [sys.executable, "-m", "scratchdet.cli", "train", *RESUME_ARGS, "--no-progress", *extra]
    if "--resume" not in extra:
        cmd += ["--out", str(run_dir)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _kill_after(run_dir, marker, sig):
    proc = _cli(run_dir)
    deadline = time.time() + 300
    while not (run_dir / marker).exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    return _finish(proc)


def _same_weights(a, b):
    sa = torch.load(a, weights_only=True)["model"]
    sb = torch.load(b, weights_only=True)["model"]
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def _metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    code, out = _finish(_cli(run))
    assert code == 0, out
    return run


@pytest.mark.parametrize("marker", ["model_0000004.pth.sha256", "model_0000008.pth.sha256"])
def test_sigkill_then_resume_is_bitwise_identical(reference, tmp_path, marker):
    run = tmp_path / "run"
    code, out = _kill_after(run, marker, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (run / "model_final.pth").exists()
    code, out = _finish(_cli(run, "--resume", str(run)))
    assert code == 0, out
    # It resumed from a checkpoint at or after the one seen before the kill (a restart from
    # scratch would reach the same weights too, so say which).
    m = re.search(r"resumed from model_(\d{7})\.pth at iteration (\d+)", out)
    assert m and int(m.group(1)) == int(m.group(2)) >= int(marker[6:13]), out
    assert _same_weights(reference / "model_final.pth", run / "model_final.pth")
    assert _metrics(run) == _metrics(reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_checkpoints_and_exits_nonzero(reference, tmp_path, sig):
    run = tmp_path / "run"
    code, out = _kill_after(run, "model_0000002.pth.sha256", sig)
    assert code != 0
    m = re.search(r"received signal \d+: checkpoint written at iteration (\d+)", out)
    assert m and "--resume" in out, out
    n = int(m.group(1))
    assert (run / f"model_{n:07d}.pth").exists() and not (run / "model_final.pth").exists()
    code, out = _finish(_cli(run, "--resume", str(run)))
    assert code == 0, out
    assert f"resumed from model_{n:07d}.pth at iteration {n}" in out
    assert _same_weights(reference / "model_final.pth", run / "model_final.pth")
    assert _metrics(run) == _metrics(reference)


def test_resume_without_checkpoint_starts_fresh(tmp_path, caplog):
    cfg = load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + ["solver.max_iter=2"])
    with caplog.at_level(logging.INFO, logger="scratchdet"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    assert "no checkpoint" in caplog.text
    assert (tmp_path / "run/model_final.pth").exists()


def test_corrupted_newest_checkpoint_falls_back(tmp_path, caplog):
    cfg = load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + ["solver.checkpoint_period=2",
                                                                       "solver.keep_checkpoints=0"])
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    shutil.copy(run / "model_final.pth", tmp_path / "uninterrupted.pth")
    for p in run.glob("model_final.pth*"):
        p.unlink()
    newest = run / "model_0000004.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.INFO):
        train(cfg, run, resume=True, progress=False)
    assert "model_0000004.pth is not usable" in caplog.text and "checksum mismatch" in caplog.text
    assert "resumed from model_0000002.pth at iteration 2" in caplog.text
    assert _same_weights(tmp_path / "uninterrupted.pth", run / "model_final.pth")


def test_checkpoint_without_sidecar_or_with_flipped_byte_is_rejected(tmp_path):
    path = tmp_path / "model_0000001.pth"
    ckpt.save_checkpoint(path, {"iteration": 1, "model": {"w": torch.ones(3)}})
    assert ckpt.verify(path) is None
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "mismatch" in ckpt.verify(path)
    path.with_name(path.name + ".sha256").unlink()
    assert "sidecar" in ckpt.verify(path)
    assert ckpt.latest_valid(tmp_path) is None


def test_prune_keeps_the_newest(tmp_path):
    for it in (2, 4, 6, 8):
        ckpt.save_checkpoint(tmp_path / f"model_{it:07d}.pth", {"iteration": it})
    ckpt.prune(tmp_path, 2)
    assert [i for i, _ in ckpt.periodic_checkpoints(tmp_path)] == [6, 8]
    assert not (tmp_path / "model_0000002.pth.sha256").exists()


def test_loading_refuses_pickled_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ckpt.load_checkpoint(path, verify_checksum=False)


def test_rng_state_roundtrip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
