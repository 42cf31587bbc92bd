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
    assert main(["train", *TINY_MODEL, *TINY_SYNTH, *TINY_SOLVER, "model.score_thresh_test=0.0", "--out", str(run),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "segm/AP" in out and str(run) in out
    assert main(["eval", "--run", str(run), "train.device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "segm: AP" in out
    metrics = json.loads((run / "inference/metrics.json").read_text())
    final = json.loads((run / "final.json").read_text())
    assert metrics["segm/AP"] == final["segm/AP"]  # the same model, the same numbers
    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    _, (val_dir, _) = resolve_datasets(cfg.data)
    assert main(["predict", val_dir, "--run", str(run), "--out", str(tmp_path / "pred"),
                 "--score-thresh", "0.0", "--device", "cpu"]) == 0
    pngs = sorted((tmp_path / "pred").glob("*.png"))
    assert len(pngs) == 4
    results = json.loads((tmp_path / "pred/coco_results.json").read_text())
    assert results and {"bbox", "score", "category_id", "segmentation", "file_name"} <= set(results[0])
