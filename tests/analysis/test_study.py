import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scratchdet.analysis.study import (
    PRETRAIN_NAME,
    emit_slurm,
    emit_torchrun,
    expand,
    load_spec,
    open_study,
    read_state,
)
from scratchdet.cli import build_parser, main, parse_args
from scratchdet.config import ConfigError, load_config, to_dict
from scratchdet.run import read_metrics
from scratchdet.synth import CLASSES, generate_cls

from ..conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH

ROOT = Path(__file__).resolve().parents[2]
TINY = TINY_MODEL + TINY_SYNTH + TINY_SOLVER
PRETRAIN = {"synth_cls": {"seed": 0, "per_class": 3, "size": 32},
            "overrides": ["pretrain.crop_size=32", "solver.max_iter=2", "solver.ims_per_batch=6", "solver.steps=[]",
                          "train.log_period=1"]}


def _spec(tmp_path, filename="study.yaml", **spec):
    path = tmp_path / filename
    path.write_text(yaml.safe_dump({"base": "default", "overrides": TINY, **spec}, sort_keys=False))
    return path


@pytest.mark.parametrize("argv", [["study", "--help"], ["report", "--help"], ["data", "synth-cls", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 0
    assert "usage: scratchdet" in capsys.readouterr().out


def test_synth_cls_is_a_balanced_deterministic_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder

    def digest(root):
        return hashlib.sha1(b"".join(p.read_bytes() for p in sorted(root.rglob("*.png")))).hexdigest()

    assert main(["data", "synth-cls", "--out", str(tmp_path / "a"), "--per-class", "4", "--size", "24"]) == 0
    generate_cls(tmp_path / "b", per_class=4, size=24)
    generate_cls(tmp_path / "c", per_class=4, size=24, seed=1)
    folder = ImageFolder(str(tmp_path / "a"))
    assert folder.classes == sorted(CLASSES)  # one sub-folder per shape class, nothing else counted as a class
    assert [folder.targets.count(i) for i in range(len(CLASSES))] == [4] * len(CLASSES)
    assert folder[0][0].size == (24, 24)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_grid_expands_into_named_runs_and_emitted_commands_give_the_same_configs(tmp_path):
    path = _spec(tmp_path, grid={"model.init": ["random", "@pretrain"], "solver.schedule": ["0.5x", "1x"],
                                 "data.subset": [0.5, 0]},
                 pretrain=PRETRAIN)
    study = open_study(path, tmp_path / "out")
    names = [m.name for m in study.members]
    assert names[0] == PRETRAIN_NAME and len(names) == 1 + 8
    assert names[1:3] == ["init-random_schedule-0.5x_subset-0.5", "init-random_schedule-0.5x_subset-0"]
    assert "init-pretrained_schedule-1x_subset-0" in names
    # Names are stable: the same spec gives the same names, in the same order.
    assert [m.name for m in open_study(path, tmp_path / "out").members] == names
    backbone = str((tmp_path / "out" / PRETRAIN_NAME / "backbone_final.pth").resolve())
    pre_member = study.members[-1]
    assert study.config(pre_member).model.init == backbone and pre_member.needs_pretrain
    assert study.config(study.members[1]).data.subset == 0.5
    # Each torchrun line, parsed as the CLI parses it, resolves to the config the in-process run uses.
    lines = [ln for ln in emit_torchrun(study, nproc=2).splitlines() if not ln.startswith(("#", "set "))]
    assert lines[0].startswith("scratchdet data synth-cls --out ")
    assert lines[1].startswith("scratchdet pretrain default ")
    train_lines = lines[2:]
    assert len(train_lines) == 8
    from scratchdet.analysis.study import execution_order

    for line, member in zip(train_lines, execution_order(study)[1:]):  # each trunk (1x) before its branch
        words = shlex.split(line)
        assert words[:6] == ["torchrun", "--nproc_per_node=2", "-m", "scratchdet", "train", "default"]
        args = parse_args(words[4:])
        assert Path(args.out) == (study.root / member.name).resolve()
        assert to_dict(load_config(args.preset, args.overrides)) == to_dict(study.config(member))
        assert (args.branch_from is not None) == (member.trunk is not None)
    scripts = emit_slurm(study, nproc=8, nodes=2)
    assert "#SBATCH --array=0-3" in scripts["study.sbatch"] and "#SBATCH --array=0-3" in scripts["branches.sbatch"]
    subprocess.run(["bash", "-n"], input=scripts["branches.sbatch"], text=True, check=True)
    assert "srun torchrun --nnodes=\"$SLURM_NNODES\" --nproc_per_node=8" in scripts["study.sbatch"]
    assert "--dependency=afterok" in scripts["study.sbatch"] and "scratchdet pretrain" in scripts["pretrain.sbatch"]
    subprocess.run(["bash", "-n"], input=scripts["study.sbatch"], text=True, check=True)  # valid shell


def test_name_template_and_spec_errors(tmp_path):
    spec = load_spec(_spec(tmp_path, grid={"model.norm": ["GN", "SyncBN"], "model.init": ["/w/r50 gn.pth"]},
                           name="{model.norm}-{model.init}"))
    assert [m.name for m in expand(spec, tmp_path, name="s").members] == ["GN-r50-gn", "SyncBN-r50-gn"]
    with pytest.raises(ConfigError, match="two runs are both named"):
        expand(load_spec(_spec(tmp_path, grid={"solver.base_lr": [0.1, 0.2]}, name="x")), tmp_path, name="s")
    with pytest.raises(ConfigError, match="no pretrain: stage"):
        expand(load_spec(_spec(tmp_path, grid={"model.init": ["@pretrain"]})), tmp_path, name="s")
    # An override naming the pretrain stage's output applies to the detection runs, not to the stage itself.
    spec = load_spec(_spec(tmp_path, overrides=TINY + ["model.init=@pretrain"], grid={"solver.max_iter": [6]},
                           pretrain=PRETRAIN))
    pre, run = expand(spec, tmp_path / "s", name="s").members
    assert not any("@pretrain" in o or "model.init" in o for o in pre.overrides) and run.needs_pretrain
    assert f"model.init={(tmp_path / 's' / PRETRAIN_NAME / 'backbone_final.pth').resolve()}" in run.overrides
    with pytest.raises(ConfigError, match="unknown study key"):
        load_spec(_spec(tmp_path, grids={}))
    assert main(["study", str(_spec(tmp_path, grid={"solver.nope": [1]})), "--out", str(tmp_path / "o"),
                 "--dry-run"]) == 2  # every member's config is checked before anything runs


def test_study_with_a_failing_member_finishes_the_others_and_reports_it(tmp_path, capsys):
    path = _spec(tmp_path, grid={"model.init": ["random", "@pretrain", str(tmp_path / "missing.pth")]},
                 overrides=TINY + ["test.eval_period=3", "model.score_thresh_test=0.0"], pretrain=PRETRAIN)
    out = tmp_path / "study"
    assert main(["study", str(path), "--out", str(out), "--no-progress"]) == 1  # a failure: non-zero, after all ran
    err = capsys.readouterr().err
    assert "init-missing" in err and "failed" in err
    state = read_state(out)["members"]
    assert state["init-missing"]["status"] == "failed" and "missing.pth" in state["init-missing"]["error"]
    for name in (PRETRAIN_NAME, "init-random", "init-pretrained"):
        assert state[name]["status"] == "done" and (out / name / "model_final.pth").is_file(), name
    # The pretrain stage's images are carried into the pretrained run's record (the comparison's Fig. 2).
    pre_seen = read_metrics(out / PRETRAIN_NAME)[-1]["images_seen"]
    assert pre_seen == 2 * 6
    line = [r for r in read_metrics(out / "init-pretrained") if "loss" in r][-1]
    assert line["pretrain_images_seen"] == pre_seen and "pretrain_images_seen" not in read_metrics(out / "init-random")[0]
    assert len(list((out / "synth_cls").rglob("*.png"))) == 3 * len(CLASSES)
    # --status: one row per member, the failure with its error, the AP of the finished runs.
    assert main(["study", str(out), "--status"]) == 0
    status = capsys.readouterr().out
    rows = {ln.split()[0]: ln for ln in status.splitlines()[2:]}
    assert set(rows) == {PRETRAIN_NAME, "init-random", "init-pretrained", "init-missing"}
    assert "failed" in rows["init-missing"] and "missing.pth" in rows["init-missing"]
    ap = [r for r in read_metrics(out / "init-random") if "bbox/AP" in r][-1]["bbox/AP"]
    assert rows["init-random"].split()[1:4] == ["done", "6/6", "100%"] and f"{ap:.2f}" in rows["init-random"]
    # TensorBoard on the study directory: every member is a run, with the scalars of its metrics.jsonl.
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(out))
    mux.Reload()
    runs = {Path(r).parts[0] for r in mux.Runs()}
    assert {PRETRAIN_NAME, "init-random", "init-pretrained"} <= runs
    events = mux.Scalars("init-pretrained/tensorboard", "bbox/AP")
    evals = [r for r in read_metrics(out / "init-pretrained") if "bbox/AP" in r]
    # TensorBoard keeps float32: compare at its precision (rounding both to 3 decimals splits a value at x.xxx5).
    assert [e.step for e in events] == [r["iteration"] for r in evals]
    assert [e.value for e in events] == pytest.approx([r["bbox/AP"] for r in evals], rel=1e-6)


def test_killed_study_resumed_skips_finished_runs_and_resumes_the_started_one(tmp_path, capsys):
    # Run "b" is long enough (40 iterations, a checkpoint every 3) to be killed in the middle.
    path = _spec(tmp_path, grid={"solver.max_iter": [6, 40]}, name="run-{solver.max_iter}")
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "scratchdet", "study", str(path), "--out", str(out), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list((out / "run-40").glob("model_00000*.pth.sha256")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert (out / "run-6/model_final.pth").is_file() and not (out / "run-40/model_final.pth").is_file()
    assert main(["study", str(out), "--status"]) == 0
    assert "interrupted" in capsys.readouterr().out  # study.json says running, but its process is gone
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "run-6").iterdir() if p.is_file()}
    assert main(["study", str(out), "--no-progress"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "run-6").iterdir() if p.is_file()} == finished  # not redone
    assert (out / "run-40/model_final.pth").is_file()
    assert "resumed from model_00000" in (out / "run-40/log.txt").read_text()
    lines = [r["iteration"] for r in read_metrics(out / "run-40") if "loss" in r]
    assert lines == list(range(2, 41, 2))  # one log line per log period, none lost or doubled by the kill
    assert json.loads((out / "study.json").read_text())["members"]["run-40"]["status"] == "done"


def test_shipped_mini_study_expands(tmp_path):
    study = open_study(ROOT / "studies" / "mini_rethink.yaml", tmp_path / "mini")
    runs = [m for m in study.members if m.kind == "train"]
    assert study.members[0].name == PRETRAIN_NAME and len(runs) == 8
    assert {m.values["model.init"] for m in runs} == {"random", "@pretrain"}
    assert len({m.values["solver.schedule"] for m in runs}) == 2 and len({m.values["data.subset"] for m in runs}) == 2
    for m in study.members:
        cfg = study.config(m)  # every config loads, with the batch and heads its time estimate was measured with
        if m.kind == "train":
            assert (cfg.solver.ims_per_batch, cfg.model.box_head_num_conv, cfg.model.mask_head_num_conv,
                    cfg.model.roi_sampling_ratio, cfg.model.rpn_post_nms_topk_train) == (4, 4, 4, 2, 500)
    assert "estimate" in (ROOT / "studies" / "mini_rethink.yaml").read_text()


def test_shipped_catch_up_study_plans_one_trunk_per_arm_and_other_classes(tmp_path):
    from scratchdet.analysis.study import check_configs, iteration_counts
    from scratchdet.schedule import check_schedule, resolve_schedule

    study = open_study(ROOT / "studies" / "rethink_cpu.yaml", tmp_path / "r")
    check_configs(study)
    runs = [m for m in study.members if m.kind == "train"]
    trunks = [m for m in runs if m.keep_at]
    assert len(runs) == 14 and len(trunks) == 4  # (random, pretrained) x (all images, 30 images)
    assert all(m.trunk in {t.name for t in trunks} for m in runs if m not in trunks)
    for m in runs:  # every length's schedule is valid (warmup before the first LR drop)
        cfg = study.config(m)
        check_schedule(resolve_schedule(cfg.solver, None))
    assert study.synth_cls["classes"] == "other"  # the pretraining corpus holds none of the detector's classes
    n = iteration_counts(study)
    assert (n["branched"], n["alone"]) == (2 * (4800 + 3 * 400) + 2 * (720 + 2 * 120), 2 * 9000 + 2 * 1260)


def test_member_saved_with_a_removed_key_resumes_without_drift(tmp_path):
    # A member's config.yaml written before solver.fp32_cpu_scale was removed is not a config change;
    # any other difference still is.
    import yaml

    from scratchdet.analysis.study import _config_drift
    from scratchdet.config import load_config, to_dict

    cfg = load_config("default")
    saved = to_dict(cfg)
    saved["solver"]["fp32_cpu_scale"] = 1.0
    run = tmp_path / "member"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert _config_drift(run, cfg) == []
    assert _config_drift(run, load_config("default", ["solver.base_lr=0.2"])) == ["solver.base_lr"]


def test_branched_run_equals_alone_bitwise(tmp_path, monkeypatch):
    """A schedule branch resumed from a longer trunk's checkpoint ends equal to the run trained alone."""
    import json
    import shutil

    import torch

    from scratchdet.config import load_config
    from scratchdet.engine import train

    from ..conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH, Killed, kill_after

    def cfg(total: int, drop: int):
        return load_config(None, TINY_MODEL + TINY_SYNTH + TINY_SOLVER + [
            f"solver.max_iter={total}", f"solver.steps=[{drop}]", "solver.checkpoint_period=100"])

    trunk = tmp_path / "trunk"
    kill_after(monkeypatch, 7)  # the trunk dies after its branch points
    with pytest.raises(Killed):
        train(cfg(8, 7), trunk, progress=False, keep_at=(4, 6))
    assert not (trunk / "model_final.pth").exists()
    for total, drop in ((6, 4), (8, 6)):
        alone, branch = tmp_path / f"alone{total}", tmp_path / f"branch{total}"
        train(cfg(total, drop), alone, progress=False)
        branch.mkdir()
        for suffix in ("", ".sha256"):
            shutil.copy(trunk / f"branch_{drop:07d}.pth{suffix}", branch / f"model_{drop:07d}.pth{suffix}")
        lines = [json.loads(s) for s in (trunk / "metrics.jsonl").read_text().splitlines()]
        (branch / "metrics.jsonl").write_text("".join(
            json.dumps({**r, "branched_from": str(trunk)}) + "\n" for r in lines if r.get("iteration", 0) <= drop))
        train(cfg(total, drop), branch, resume=True, progress=False)
        a = torch.load(alone / "model_final.pth", weights_only=False)["model"]
        b = torch.load(branch / "model_final.pth", weights_only=False)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), total


def test_schedule_grid_trains_one_trunk_and_branches_equal_alone(tmp_path, monkeypatch, capsys):
    """Lengths of one arm share a trunk: 18 + (9 - 3) iterations instead of 27, each ending as alone."""
    import torch

    import scratchdet.engine as engine
    from scratchdet.analysis.study import format_status, run_study
    from scratchdet.engine import train

    # Unit 9: 1x is 9 iterations, LR drops at 3 and 7; 2x is 18, drops at 12 and 16 (the paper's shape).
    sched = ["solver.schedule_unit=9", "solver.reference_batch_size=2", "solver.warmup_iters=2",
             "solver.checkpoint_period=100"]
    spec = _spec(tmp_path, overrides=TINY + sched, grid={"solver.schedule": ["1x", "2x"], "train.seed": [0, 1]})
    study = open_study(spec, tmp_path / "s")
    runs = {m.name: m for m in study.members}
    assert runs["schedule-2x_seed-0"].keep_at == (3,) and runs["schedule-1x_seed-0"].trunk == "schedule-2x_seed-0"
    assert runs["schedule-1x_seed-1"].trunk == "schedule-2x_seed-1"  # one trunk per arm: the seed is an arm's key
    emitted = emit_torchrun(study, nproc=2)
    assert emitted.index("schedule-2x_seed-0 --keep-at 3") < emitted.index("schedule-1x_seed-0 --branch-from")
    # Each branch waits for its own trunk's array task (trunks are study.sbatch's tasks 0 and 1).
    submit = emit_slurm(study, nproc=8, nodes=1)["branches.sbatch"]
    assert "--dependency=afterok:${runs}_0 --array=0" in submit and "--dependency=afterok:${runs}_1 --array=1" in submit
    assert "runs=${runs%%;*}" in submit  # --parsable may print JOB;CLUSTER

    steps = []
    real_step = engine.train_step
    monkeypatch.setattr(engine, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    assert set(run_study(study, progress=False).values()) == {"done"}
    assert len(steps) == 2 * (18 + 6)  # two arms, each one trunk and one 6-iteration tail (alone: 2 x 27)
    status = format_status(open_study(tmp_path / "s"))
    assert "branch of schedule-2x_seed-0 at 3" in status and "trunk (branches at 3)" in status
    assert "iterations: 48 run of 48 planned with branching; 54 trained alone, so branching saves 6 (11%)" in status

    branch = tmp_path / "s" / "schedule-1x_seed-1"
    copied = [r for r in read_metrics(branch) if "branched_from" in r]
    own = [r for r in read_metrics(branch) if "branched_from" not in r]
    assert [r["iteration"] for r in copied] == [2] and min(r["iteration"] for r in own) == 4  # logged every 2
    assert copied[0]["branched_from"] == str((tmp_path / "s" / "schedule-2x_seed-1").resolve())
    alone = tmp_path / "alone"
    train(load_config(None, TINY + sched + ["solver.schedule=1x", "train.seed=1"]), alone, progress=False)
    a = torch.load(alone / "model_final.pth", weights_only=True)["model"]
    b = torch.load(branch / "model_final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_branch_refuses_a_trunk_of_another_config_and_a_missing_branch_point(tmp_path):
    from scratchdet.engine import train

    base = TINY + ["solver.schedule_unit=9", "solver.reference_batch_size=2", "solver.warmup_iters=2",
                   "solver.checkpoint_period=100"]
    trunk = tmp_path / "trunk"
    train(load_config(None, base + ["solver.schedule=2x"]), trunk, progress=False, keep_at=(3,))
    assert (trunk / "branch_0000003.pth").is_file()
    with pytest.raises(FileExistsError, match="its config differs in solver.base_lr"):
        train(load_config(None, base + ["solver.schedule=1x", "solver.base_lr=0.01"]), tmp_path / "b1",
              progress=False, branch_from=trunk)
    with pytest.raises(FileNotFoundError, match="branch_0000008.pth"):  # 1.5x: 14 iterations, first drop at 8
        train(load_config(None, base + ["solver.schedule=1.5x"]), tmp_path / "b2",
              progress=False, branch_from=trunk)
    with pytest.raises(ConfigError, match="--keep-at 18"):
        train(load_config(None, base + ["solver.schedule=2x"]), tmp_path / "t2", progress=False, keep_at=(18,))
    # A trunk whose own LR dropped (at 2) before the branch point (3) was another run up to there.
    early = tmp_path / "early"
    train(load_config(None, TINY + ["solver.max_iter=10", "solver.steps=[2]", "solver.warmup_iters=1"]), early,
          progress=False, keep_at=(3,))
    with pytest.raises(FileExistsError, match="dropped at iteration 2, before the branch point"):
        train(load_config(None, TINY + ["solver.max_iter=6", "solver.steps=[3]", "solver.warmup_iters=1"]), tmp_path / "b3",
              progress=False, branch_from=early)
    assert not (tmp_path / "b3" / "model_0000003.pth").exists()


def test_branch_killed_while_starting_starts_again_with_the_trunks_curve(tmp_path, monkeypatch):
    """The copied metrics are written before the checkpoint that marks a branch as started."""
    from scratchdet import checkpoint as ckpt
    from scratchdet.branching import start_branch
    from scratchdet.engine import train

    trunk = tmp_path / "trunk"
    train(load_config(None, TINY + ["solver.max_iter=10", "solver.steps=[8]"]), trunk, progress=False, keep_at=(4,))
    real_bytes, real_text = ckpt.atomic_write_bytes, Path.write_text

    def killed(path, *a, **k):  # the process dies as it writes the branch's metrics (either way of writing)
        if Path(path).name == "metrics.jsonl":
            raise KeyboardInterrupt
        return (real_bytes if isinstance(a[0], bytes) else real_text)(path, *a, **k)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", killed)
    monkeypatch.setattr(Path, "write_text", killed)
    branch = tmp_path / "branch"
    with pytest.raises(KeyboardInterrupt):
        start_branch(trunk, branch, 4)
    monkeypatch.undo()
    assert start_branch(trunk, branch, 4)  # not taken for a started branch
    assert [r["iteration"] for r in read_metrics(branch)] == [2, 4]


def test_branch_whose_branch_point_is_its_end_logs_as_a_run_alone(tmp_path, monkeypatch):
    """A schedule without LR drops branches at its end: one last loss line (the run-alone one) and one
    final evaluation, also when the branch is killed before model_final.pth and started again."""
    from collections import Counter

    from scratchdet import checkpoint as ckpt
    from scratchdet.engine import train
    from scratchdet.run import RunRecord

    def cfg(total: int):
        return load_config(None, TINY + [f"solver.max_iter={total}", "solver.steps=[]", "solver.warmup_iters=2",
                                         "train.log_period=4", "test.eval_period=5"])

    trunk, alone, branch = tmp_path / "trunk", tmp_path / "alone", tmp_path / "branch"
    train(cfg(8), trunk, progress=False, keep_at=(5,))  # evaluates at 5: not the branch's final evaluation
    train(cfg(5), alone, progress=False)
    real = RunRecord.checkpoint

    def killed(self, name, **kwargs):
        if name == ckpt.FINAL:
            raise KeyboardInterrupt
        return real(self, name, **kwargs)

    monkeypatch.setattr(RunRecord, "checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(5), branch, progress=False, branch_from=trunk)
    monkeypatch.setattr(RunRecord, "checkpoint", real)
    train(cfg(5), branch, progress=False, branch_from=trunk)  # the same command again (a resubmitted job)

    def at_end(run):
        return [r for r in read_metrics(run) if r.get("iteration") == 5]

    kinds = {d: Counter("loss" if "loss" in r else "matches" if "matches" in r else "eval" for r in at_end(d))
             for d in (alone, branch)}
    assert kinds[branch] == kinds[alone] == Counter(loss=1, eval=1, matches=1)
    last = {d: next(r for r in at_end(d) if "loss" in r) for d in (alone, branch)}
    assert last[branch]["loss"] == last[alone]["loss"] and last[branch]["images_seen"] == 10


def test_trains_alone_says_which_keys_differ_and_why_epochs_cannot_branch(tmp_path):
    grids = [{"solver.schedule": ["1x", "2x"]}, {"solver.schedule": ["1x"], "solver.base_lr": [0.01]}]
    study = open_study(_spec(tmp_path, grid=grids, overrides=TINY + ["solver.schedule_unit=9"]), tmp_path / "s")
    lone = study.members[2]
    assert lone.trunk is None and not lone.keep_at
    assert "the closest run, schedule-1x, differs in solver.base_lr" in lone.alone_reason
    study = open_study(_spec(tmp_path, filename="ep.yaml", grid={"solver.epochs": [1.0, 2.0]}, overrides=TINY),
                       tmp_path / "e")
    assert all("solver.epochs without data.subset" in m.alone_reason for m in study.members)
    # With the set's size given, epoch schedules branch like any other (the drops at fixed fractions).
    study = open_study(_spec(tmp_path, filename="ep2.yaml", grid={"solver.epochs": [2.0, 4.0]},
                             overrides=TINY + ["data.subset=12"]), tmp_path / "e2")
    assert study.members[0].trunk == study.members[1].name


def test_a_list_of_grids_runs_each_product_in_turn(tmp_path):
    """The catch-up grid on all images and a breakdown grid on a small subset, in one study file."""
    grids = [{"solver.schedule": ["1x", "2x"], "data.subset": [0]},
             {"solver.schedule": ["1x"], "data.subset": [4], "solver.schedule_unit": [6]}]
    study = open_study(_spec(tmp_path, grid=grids, overrides=TINY + ["solver.schedule_unit=9"]), tmp_path / "s")
    names = [m.name for m in study.members]
    assert names == ["schedule-1x_subset-0", "schedule-2x_subset-0", "schedule-1x_subset-4_schedule_unit-6"]
    assert study.config(study.members[2]).solver.schedule_unit == 6
    assert study.members[0].trunk == "schedule-2x_subset-0" and study.members[2].trunk is None
    with pytest.raises(ConfigError, match=r"grid\[1\]: a mapping"):
        load_spec(_spec(tmp_path, filename="bad.yaml", grid=[{"solver.schedule": ["1x"]}, ["x"]]))
