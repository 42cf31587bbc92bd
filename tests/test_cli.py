import json
import subprocess
import sys

import pytest
import yaml

from scratchdet.cli import build_parser, main
from scratchdet.config import from_dict
from scratchdet.data import resolve_datasets

from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["predict", "--help"],
                                  ["data", "synth", "--help"], ["data", "stats", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 0
    assert "usage: scratchdet" in capsys.readouterr().out


def test_console_script_dry_run_prints_parameter_count(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scratchdet.cli", "train", "mask_rcnn_R50_FPN_GN_scratch_6x",
                          "solver.ims_per_batch=2", "--dry-run"], capture_output=True, text=True, cwd=tmp_path,
                         check=True).stdout
    assert "45,715,509 parameters (45,715,509 trainable)" in out
    assert "LR drops at [3840000, 4160000]" in out


def test_bad_override_is_a_clear_error(capsys):
    assert main(["train", "solver.nope=1", "--dry-run"]) == 2
    assert "unknown config key 'solver.nope'" in capsys.readouterr().err


def test_data_synth_and_stats(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--num-train", "3", "--num-val", "2",
                 "--image-size", "64"]) == 0
    assert (tmp_path / "d/annotations/instances_val.json").is_file()
    assert main(["data", "stats", "--annotations", str(tmp_path / "d/annotations/instances_train.json"),
                 "--images", str(tmp_path / "d/train")]) == 0
    assert "model.pixel_mean=[" in capsys.readouterr().out


def test_train_eval_predict_from_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    # bf16 and channels-last, as the default job runs: `eval --run` must use the run's precision and
    # memory format, and give the very detections the run's own final evaluation gave.
    assert main(["train", *TINY_MODEL, *TINY_SYNTH, *TINY_SOLVER, "model.score_thresh_test=0.0", "--out", str(run),
                 "--no-progress", "train.amp=bf16", "train.channels_last=true"]) == 0
    out = capsys.readouterr().out
    assert "segm/AP" in out and str(run) in out
    trained = json.loads((run / "coco_instances_results.json").read_text())
    assert main(["eval", "--run", str(run), "train.device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "segm: AP" in out and "evaluating in bf16" in out
    metrics = json.loads((run / "inference/metrics.json").read_text())
    final = json.loads((run / "final.json").read_text())
    assert len(trained) > 10
    assert json.loads((run / "inference/coco_instances_results.json").read_text()) == trained
    assert {k: v for k, v in metrics.items() if "/" in k} == {k: v for k, v in final.items() if "/" in k}
    assert len([k for k in metrics if "/" in k]) == 24
    # train.amp=off on the eval command line evaluates in fp32 instead.
    assert main(["eval", "--run", str(run), "train.device=cpu", "train.amp=off"]) == 0
    assert "evaluating in fp32" in capsys.readouterr().out
    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    _, (val_dir, _) = resolve_datasets(cfg.data)
    assert main(["predict", val_dir, "--run", str(run), "--out", str(tmp_path / "pred"),
                 "--score-thresh", "0.0", "--device", "cpu"]) == 0
    pngs = sorted((tmp_path / "pred").glob("*.png"))
    assert len(pngs) == 4
    results = json.loads((tmp_path / "pred/coco_results.json").read_text())
    assert results and {"bbox", "score", "category_id", "segmentation", "file_name"} <= set(results[0])


@pytest.mark.parametrize("argv", [
    ["train", "default", "--out", "OUT", "solver.max_iter=7", "--dry-run"],
    ["train", "--out", "OUT", "default", "solver.max_iter=7", "--dry-run"],
    ["train", "solver.max_iter=7", "--out", "OUT", "--dry-run"],
    ["train", "--dry-run", "solver.warmup_iters=3", "--out", "OUT", "default", "solver.max_iter=7"],
    ["train", "solver.max_iter=5", "--out", "OUT", "solver.max_iter=7", "--dry-run"],  # the later one wins
])
def test_options_and_overrides_in_any_order(argv, tmp_path, capsys):
    argv = [str(tmp_path / "run") if a == "OUT" else a for a in argv]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert '"max_iter": 7' in out and str(tmp_path / "run") in out


def test_two_presets_or_an_unknown_option_are_errors(capsys):
    with pytest.raises(SystemExit):
        main(["train", "default", "other", "--dry-run"])
    assert "more than one preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--dry-run", "--nope"])
    assert "unrecognized argument: --nope" in capsys.readouterr().err


def test_config_into_a_closed_pipe_ends_quietly():
    import subprocess

    p = subprocess.run(f"{sys.executable} -m scratchdet config | head -2", shell=True, capture_output=True, text=True,
                       timeout=120)
    assert "BrokenPipeError" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stdout.splitlines()) == 2


def test_config_without_argument_shows_what_train_uses(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "model.depth = 18  (built-in: 50)" in out  # the default preset's, not the dataclass's
    assert "data.min_size_train = [256]" in out


@pytest.mark.parametrize("override, key", [("solver.max_iter=0", "solver.max_iter"),
                                           ("test.eval_period=-5", "test.eval_period"),
                                           ("solver.checkpoint_period=0", "solver.checkpoint_period")])
def test_lengths_and_periods_out_of_range_are_refused(override, key, capsys):
    assert main(["train", override, "--dry-run"]) == 2
    assert f"{key}: " in capsys.readouterr().err


def test_resume_of_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    typo = tmp_path / "runs" / "my_rnu"
    assert main(["train", "--resume", str(typo)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert not typo.exists()  # nothing created, nothing trained


def test_a_run_that_failed_at_its_start_can_be_retried_without_force(tmp_path):
    from scratchdet.run import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    (run / "metrics.jsonl").write_text("")  # the first attempt died before its first log line
    prepare_run_dir(run, resume=False, force=False)  # no FileExistsError: nothing to protect
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 20, "loss": 1.0}) + "\n")
    with pytest.raises(FileExistsError, match="already holds a run"):
        prepare_run_dir(run, resume=False, force=False)


def test_dry_run_of_a_missing_annotations_file_is_a_clean_error(tmp_path):
    typo = tmp_path / "instances_trian2017.json"
    p = subprocess.run([sys.executable, "-m", "scratchdet.cli", "train", f"data.train.images={tmp_path}",
                        f"data.train.annotations={typo}", "--dry-run"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [f"scratchdet: error: {typo}: annotation file not found"]


def _coco_set(root, text_image=None):
    """A 2-image COCO set in ``root`` (images 40x32); ``text_image`` names a file written as text instead."""
    from PIL import Image

    root.mkdir()
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 32, "width": 40} for i in (1, 2)]
    anns = [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [4, 4, 16, 16], "area": 256, "iscrowd": 0,
             "segmentation": [[4, 4, 20, 4, 20, 20, 4, 20]]} for i in (1, 2)]
    for im in images:
        if im["file_name"] == text_image:
            (root / im["file_name"]).write_text("a text file posing as a JPEG\n")
        else:
            Image.new("RGB", (40, 32), (200, 40, 40)).save(root / im["file_name"])
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}))
    return [f"data.train.images={root}", f"data.train.annotations={ann}"]


def test_dry_run_of_a_text_file_posing_as_a_jpeg_names_the_file_and_image_id(tmp_path, capsys):
    data = _coco_set(tmp_path / "d", text_image="2.jpg")
    assert main(["train", *data, *TINY_MODEL, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"scratchdet: error: {tmp_path / 'd' / '2.jpg'}: cannot read image id 2 in {tmp_path / 'd' / 'ann.json'}" in err
    assert "Traceback" not in err


def test_dry_run_of_a_good_set_lists_the_checks_passed(tmp_path, capsys):
    data = _coco_set(tmp_path / "d")
    assert main(["train", *data, *[d.replace("train", "val") for d in data], *TINY_MODEL, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "check passed: training set read; 2 images open as images of their annotated size" in out
    assert f"check passed: validation set {tmp_path / 'd' / 'ann.json'} read (2 images, the training set's " \
           "categories); 2 images open" in out


def test_dry_run_on_tiny_coco_at_the_default_size_says_the_input_size_and_warns(tiny_coco, capsys):
    # Real photos (COCO's 640 px) under the default preset, which trains at 256 px for its synthetic shapes.
    t, a = tiny_coco, tiny_coco / "annotations"
    assert main(["train", f"data.train.images={t / 'train2017'}", f"data.train.annotations={a / 'instances_train2017.json'}",
                 f"data.val.images={t / 'val2017'}", f"data.val.annotations={a / 'instances_val2017.json'}",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "check passed: training set read; 49 images open" in out and "50 images open" in out
    assert "input size: training shorter side 256, longer side at most 256 (data.min_size_train, " \
           "data.max_size_train), flip 0.5; test shorter side 256, longer at most 256" in out
    assert "anchors: [12, 24, 48, 96, 192] px on P2-P6" in out
    assert "training images are shrunk 2.5x on median by the training resize, shorter side 427 px, longer 640" in out
    assert "raise data.min_size_train / data.max_size_train" in out and "data.fit=true" in out
