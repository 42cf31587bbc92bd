import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scratchdet.cli import main
from scratchdet.config import load_config
from scratchdet.evaluation import STAT_NAMES
from scratchdet.report import COLORS, HEADER_BG, build_report
from scratchdet.run import read_metrics

from .conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH

# Two evaluations per run (iterations 3 and 6), every detection kept: curves with two points and non-zero AP.
TINY = TINY_MODEL + TINY_SYNTH + TINY_SOLVER + ["test.eval_period=3", "model.score_thresh_test=0.0"]
BLUE = tuple(int(COLORS[0][i:i + 2], 16) for i in (1, 3, 5))  # the first pair's color: both runs differ only in init
HEADER = tuple(int(HEADER_BG[i:i + 2], 16) for i in (1, 3, 5))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny random-init run and its twin fine-tuned from a tiny `scratchdet pretrain` on synthetic crops."""
    from scratchdet.engine import train
    from scratchdet.pretrain import pretrain
    from scratchdet.synth import generate_cls

    root = tmp_path_factory.mktemp("report_runs")
    generate_cls(root / "cls", per_class=3, size=32)
    backbone = pretrain(load_config(None, TINY_MODEL + [f"pretrain.images={root / 'cls'}", "pretrain.crop_size=32",
                                                       "solver.max_iter=2", "solver.ims_per_batch=6", "solver.steps=[]",
                                                       "dataloader.num_workers=0", "train.device=cpu", "train.amp=off"]),
                        root / "study" / "pretrain", progress=False)
    train(load_config(None, TINY), root / "study" / "scratch", progress=False)
    train(load_config(None, TINY + [f"model.init={backbone}"]), root / "study" / "pretrained", progress=False)
    return root


def _near(image: np.ndarray, color: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(image.astype(int) - np.array(color)).max(-1) <= tol).sum())


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {r[next(iter(r))]: r for r in csv.DictReader(f)}


def test_report_from_two_runs_draws_figures_and_holds_their_numbers(runs, tmp_path, capsys):
    out = tmp_path / "report"
    # The study folder (as `scratchdet study` leaves it: the pretrain stage beside the runs) is reported as its runs.
    assert main(["report", str(runs / "study"), "--out", str(out), "--pretrain-offset"]) == 0
    assert "Table 1: schedule x init" in capsys.readouterr().out
    for stem in ("ap_curves", "seen"):
        png = np.asarray(Image.open(out / f"{stem}.png").convert("RGB"))
        non_white = (png < 240).any(-1).mean()
        assert png.std() > 20 and non_white > 0.05, stem  # not blank
        assert _near(png, BLUE) > 100, stem  # the runs' lines / bars are drawn in their color
        assert (out / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    records = {name: read_metrics(runs / "study" / name) for name in ("scratch", "pretrained")}
    last = {name: [r for r in recs if "bbox/AP" in r][-1] for name, recs in records.items()}
    for t in ("bbox", "segm"):
        table = _rows(out / "tables" / f"coco_{t}.csv")
        assert set(table) == {"scratch", "pretrained"}
        for name, row in table.items():
            assert [float(row[k]) for k in STAT_NAMES] == [last[name][f"{t}/{k}"] for k in STAT_NAMES]
            assert row["init"] == ("random init" if name == "scratch" else "pretrained")
    pivot = list(_rows(out / "tables" / "table1_schedule.csv").values())
    assert len(pivot) == 1 and pivot[0]["schedule"] == "6 it"
    assert float(pivot[0]["box AP random init"]) == last["scratch"]["bbox/AP"]
    assert float(pivot[0]["mask AP pretrained"]) == last["pretrained"]["segm/AP"]
    assert float(pivot[0]["box AP random init - pretrained"]) == pytest.approx(
        last["scratch"]["bbox/AP"] - last["pretrained"]["bbox/AP"], abs=1e-4)
    assert list(_rows(out / "tables" / "table_data_size.csv")) == ["all"]
    seen = _rows(out / "tables" / "seen.csv")
    pre_images = read_metrics(runs / "study" / "pretrain")[-1]["images_seen"]
    assert int(seen["pretrained"]["pretrain images"]) == pre_images == 12
    assert int(seen["scratch"]["pretrain images"]) == 0
    assert int(seen["scratch"]["images"]) == [r for r in records["scratch"] if "images_seen" in r][-1]["images_seen"]
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "http://" not in page and "https://" not in page
    assert f"{last['scratch']['bbox/AP']:.2f}" in page


def test_report_reads_only_metrics_and_config_and_escapes_names(runs, tmp_path):
    # A run copied as its two files, into a folder whose name is HTML.
    odd = tmp_path / "copies" / '<b>x&"y"'
    odd.mkdir(parents=True)
    for name in ("metrics.jsonl", "config.yaml"):
        shutil.copy(runs / "study" / "scratch" / name, odd / name)
    result = build_report([odd, runs / "study" / "pretrained"], tmp_path / "r")
    assert {r.name for r in result["runs"]} == {'<b>x&"y"', "pretrained"}
    page = (tmp_path / "r" / "index.html").read_text()
    assert "&lt;b&gt;x&amp;&quot;y&quot;" in page and "<b>x" not in page


def test_compare_two_runs_side_by_side(runs, tmp_path, capsys):
    a, b = runs / "study" / "scratch", runs / "study" / "pretrained"
    assert main(["report", "--compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "Config: where scratch and pretrained differ" in out and "model.init" in out
    metrics = _rows(tmp_path / "cmp" / "tables" / "compare_metrics.csv")
    la = [r for r in read_metrics(a) if "segm/AP" in r][-1]["segm/AP"]
    lb = [r for r in read_metrics(b) if "segm/AP" in r][-1]["segm/AP"]
    assert float(metrics["segm/AP"]["scratch"]) == la and float(metrics["segm/AP"]["pretrained"]) == lb
    assert float(metrics["segm/AP"]["pretrained - scratch"]) == pytest.approx(lb - la, abs=1e-4)
    assert (tmp_path / "cmp" / "compare.png").is_file()
    assert "scratch vs pretrained" in (tmp_path / "cmp" / "index.html").read_text()


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_report_page_renders_in_headless_chromium(runs, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium not found (Debian: apt-get install -y chromium; .ci/run installs it)")
    build_report([runs / "study"], tmp_path / "report")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1200,2000", (tmp_path / "report" / "index.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (2000, 1200) and image.std() > 20  # not blank
    top = image[:1000]
    assert _near(top, BLUE) > 100  # the curves (the inlined PNG decoded and drawn)
    assert _near(image, HEADER) > 2000  # the tables' header rows


# ---- the page stands on its own (issue 15, item 8), on runs written as their two files: no training needed.

HOME = "/home/someone/experiments"  # a machine path in the runs' configs: it must not reach the page
PRE_IMAGES = 96_000  # the pre-training's images: 24,000 iterations at batch 4, against runs of 360-720


def _fake_run(root: Path, name: str, *, max_iter: int, subset: int, pretrained: bool) -> Path:
    """A run as `scratchdet report` reads it: config.yaml and metrics.jsonl, three evaluations."""
    import json

    import yaml

    d = root / name
    d.mkdir(parents=True)
    config = {"model": {"init": f"{HOME}/pretrain/backbone_final.pth" if pretrained else "random", "depth": 50,
                        "norm": "GN", "task": "masks"},
              "solver": {"max_iter": max_iter, "steps": [max_iter * 2 // 3, max_iter * 8 // 9], "ims_per_batch": 4,
                         "base_lr": 0.02, "warmup_iters": 10},
              "data": {"subset": subset, "train": {"annotations": f"{HOME}/coco/train.json", "images": f"{HOME}/img"},
                       "min_size_train": [800], "max_size_train": 1333}}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for k in (1, 2, 3):
        it = max_iter * k // 3
        lines.append({"iteration": it, "loss_mask": 0.5, "images_seen": 4 * it, "instances_seen": 20 * it,
                      "pixels_seen": 10**6 * it, "pretrain_images_seen": PRE_IMAGES if pretrained else 0})
        ap = 10.0 * k + (5 if pretrained else 0) + max_iter / 100
        lines.append({"iteration": it, "bbox/AP": ap, "segm/AP": ap - 1})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


@pytest.fixture
def grid(tmp_path) -> Path:
    """Two schedules x two data sizes x two inits: 8 runs, 4 colours, 2 line styles, 4 LR drops."""
    root = tmp_path / "study"
    for max_iter in (360, 720):
        for subset in (150, 600):
            for pretrained in (False, True):
                _fake_run(root, f"{'pre' if pretrained else 'rand'}_{max_iter}_{subset}", max_iter=max_iter,
                          subset=subset, pretrained=pretrained)
    return root


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def _drop_lines(ax) -> list[float]:
    """The vertical lines of an axis (axvline: both x the same), not the curves."""
    return sorted(float(line.get_xdata()[0]) for line in ax.lines
                  if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1])


def test_legend_is_one_entry_per_colour_and_one_per_init(grid):
    from scratchdet.report import curves_figure, load_runs

    runs = load_runs([grid])
    texts = _legend_texts(curves_figure(runs))
    assert len(texts) == 4 + 2, texts  # 4 colours (schedule x data size) + solid/dashed, not 8 run names
    assert "random init" in texts and "pretrained" in texts
    assert not {r.name for r in runs} & set(texts)
    assert sum("data size: 150 images" in t for t in texts) == 2  # a colour says what it stands for


def test_one_labelled_lr_drop_marker_per_schedule(grid):
    from scratchdet.report import curves_figure, load_runs

    fig = curves_figure(load_runs([grid]))
    for ax in fig.axes:
        # 360 it drops at 240 and 320, 720 it at 480 and 640: four markers whatever the number of runs.
        assert _drop_lines(ax) == [240, 320, 480, 640]
        labels = [t.get_text() for t in ax.texts]
        assert len(labels) == 4 and all("LR/10" in t for t in labels)
        assert sum("720 it" in t for t in labels) == 2


def test_pretraining_is_drawn_on_its_own_scale(grid):
    from scratchdet.report import curves_figure, load_runs

    fig = curves_figure(load_runs([grid]), pretrain_offset=True)
    spans = sorted(ax.get_xlim()[1] for ax in fig.axes)
    # Fine-tuning axes end near the longest run (720), not at 24,000 + 720; pre-training has an axis of its own.
    assert sum(s <= 800 for s in spans) == 2 and sum(s >= PRE_IMAGES / 4 for s in spans) == 2, spans


def test_page_says_what_each_run_had_and_names_no_machine_path(grid, tmp_path):
    out = tmp_path / "report"
    build_report([grid], out, pretrain_offset=True)
    page = (out / "index.html").read_text()
    for path in (HOME, str(tmp_path), str(grid)):
        assert path not in page
        for csv_file in (out / "tables").iterdir():
            assert path not in csv_file.read_text(), csv_file.name
    runs = _rows(out / "tables" / "runs.csv")
    row = runs["pre_720_600"]
    assert row["data"].startswith("train.json") and "shorter side 800" in row["data"]
    assert row["model"] == "masks, R50-FPN, GN" and row["batch"] == "4"
    assert "720 it" in row["schedule"] and "/10 at 480, 640" in row["schedule"] and "warmup 10" in row["schedule"]
    assert row["init"] == "pretrained (pretrain/backbone_final.pth)"
    # Every figure carries a caption saying what it shows.
    assert page.count("<figure>") == page.count("<figcaption>") == page.count("data:image/png;base64,") == 2
    assert "solid random init, dashed pretrained" in page and "LR drops" in page


def test_random_init_is_one_wording_in_every_table(grid, tmp_path):
    out = tmp_path / "report"
    build_report([grid], out)
    for name in ("table1_schedule.csv", "table_data_size.csv", "coco_bbox.csv", "runs.csv", "seen.csv"):
        with open(out / "tables" / name) as f:
            header, *rows = list(csv.reader(f))
        assert not any("scratch" in c for c in header), (name, header)
        if "init" in header:
            assert {r[header.index("init")].split(" (")[0] for r in rows} == {"random init", "pretrained"}, name
    header = next(csv.reader(open(out / "tables" / "table1_schedule.csv")))
    assert "box AP random init" in header and "box AP random init - pretrained" in header


def test_findings_on_runs_without_matches_or_pretrain_pixels_say_what_they_lack(grid, tmp_path):
    """Runs from before the matches records and the pre-training pixel counts: the findings say so, and no figure."""
    out = tmp_path / "report"
    build_report([grid], out, resamples=200)
    page = (out / "index.html").read_text()
    assert "Findings: the paper's questions" in page
    assert "no per-image matches in run rand_360_150 (trained before they were recorded): no intervals" in page
    assert "no pre-training counts (pretrain_images_seen and pretrain_pixels_seen)" in page
    assert "2 schedule length(s); a saturating fit needs 3: no prediction" in page
    # Without intervals a large gain is still read: 360 -> 720 it at 600 images adds 3.6 AP.
    assert "data size: 600 images, box AP: NOT levelled off (last doubling adds 3.60" in page
    assert page.count("data:image/png;base64,") == 2  # Fig. 1 and the seen bars only
    assert (out / "findings.txt").read_text().startswith("== Catch-up")
    assert (out / "tables" / "catch_up.csv").is_file() and (out / "tables" / "plateau.csv").is_file()
