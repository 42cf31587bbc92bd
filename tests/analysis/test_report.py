import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scratchdet.analysis.report import COLORS, HEADER_BG, build_report
from scratchdet.cli import main
from scratchdet.config import load_config
from scratchdet.evaluation import STAT_NAMES
from scratchdet.run import read_metrics

from ..conftest import TINY_MODEL, TINY_SOLVER, TINY_SYNTH

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
    from matplotlib.colors import to_rgb

    from scratchdet.analysis.report import curves_figure, load_runs

    curve = curves_figure(load_runs([runs / "study"])).axes[0].lines[0].get_color()  # the schedule's colour
    for stem, color in (("ap_curves", tuple(round(255 * v) for v in to_rgb(curve))), ("seen", BLUE)):
        png = np.asarray(Image.open(out / f"{stem}.png").convert("RGB"))
        non_white = (png < 240).any(-1).mean()
        assert png.std() > 20 and non_white > 0.05, stem  # not blank
        assert _near(png, color) > 100, stem  # the runs' lines / bars are drawn in their color
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
    from matplotlib.colors import to_rgb

    from scratchdet.analysis.report import curves_figure, load_runs

    curve = curves_figure(load_runs([runs / "study"])).axes[0].lines[0].get_color()
    top = image[:1000]
    assert _near(top, tuple(round(255 * v) for v in to_rgb(curve))) > 100  # the curves (the inlined PNG drawn)
    assert _near(image, HEADER) > 2000  # the tables' header rows


# ---- the page stands on its own, on runs written as their two files: no training needed.

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


def _ticks(ax) -> list[float]:
    """The LR-drop ticks of an axis: the markers drawn without a line ('|')."""
    return sorted(float(x) for line in ax.lines if line.get_marker() == "|" for x in line.get_xdata())


def test_one_panel_per_data_size_arms_in_the_papers_words(grid):
    from scratchdet.analysis.report import curves_figure, load_runs

    runs = load_runs([grid])
    fig = curves_figure(runs)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["box AP, data size: 150 images", "mask AP, data size: 150 images",
                      "box AP, data size: 600 images", "mask AP, data size: 600 images"]
    for ax in fig.axes:  # each panel holds its data size's four curves, nothing empty
        assert len([line for line in ax.lines if line.get_marker() in ("o", "s")]) == 4
    texts = _legend_texts(fig)
    assert texts[:4] == ["random init, 360 it", "random init, 720 it", "pretrained, 360 it", "pretrained, 720 it"]
    assert len(texts) == 5 and "LR drop" in texts[4]  # no run names, no config strings
    assert not {r.name for r in runs} & set(texts) and not any("solver." in t or "data size" in t for t in texts)


def test_lr_drops_are_short_ticks_in_their_curves_colour(grid):
    from scratchdet.analysis.report import curves_figure, load_runs

    fig = curves_figure(load_runs([grid]))
    for ax in fig.axes:
        # 360 it drops at 240 and 320, 720 it at 480 and 640; each curve ticks its own (twins share the places).
        assert sorted(set(_ticks(ax))) == [240, 320, 480, 640]
        assert not ax.texts  # no stacked labels
        colors = {line.get_color() for line in ax.lines if line.get_marker() == "|"}
        assert colors == {line.get_color() for line in ax.lines if line.get_marker() in ("o", "s")}


def test_seed_replicates_are_one_curve_with_a_band(grid):
    import json

    import yaml

    from scratchdet.analysis.report import curves_figure, load_runs

    for name, seed, bump in (("rand_720_600", 0, 0.0), ("rand_720_600_s1", 1, 4.0)):
        if bump:
            shutil.copytree(grid / "rand_720_600", grid / name)
            lines = [json.loads(x) for x in (grid / name / "metrics.jsonl").read_text().splitlines()]
            (grid / name / "metrics.jsonl").write_text("".join(
                json.dumps({k: v + bump if k.endswith("/AP") else v for k, v in x.items()}) + "\n" for x in lines))
        cfg = yaml.safe_load((grid / name / "config.yaml").read_text())
        (grid / name / "config.yaml").write_text(yaml.safe_dump({**cfg, "train": {"seed": seed}}))
    fig = curves_figure(load_runs([grid]))
    ax = fig.axes[2]  # box AP at 600 images
    curves = [line for line in ax.lines if line.get_marker() in ("o", "s")]
    assert len(curves) == 4 and len(ax.collections) == 1  # the two seeds: one mean curve, one band
    mean = next(c for c in curves if c.get_xdata()[-1] == 720 and c.get_linestyle() == "-")
    assert list(mean.get_ydata()) == pytest.approx([19.2, 29.2, 39.2])  # the mean of 17.2 and 21.2, ...
    assert "seeds pooled" in " ".join(_legend_texts(fig))


def test_pretraining_is_counted_without_an_empty_panel_or_a_squashed_axis(grid):
    from scratchdet.analysis.report import curves_figure, load_runs

    runs = load_runs([grid])
    fig = curves_figure(runs, pretrain_offset=True)
    assert len(fig.axes) == 4  # no panel of its own, nothing empty
    # 96,000 images of pre-training (24,000 of these runs' iterations) against runs of 360-720: drawn, it would
    # squash them; the legend says it.
    assert max(ax.get_xlim()[1] for ax in fig.axes) < 800
    assert "pretrained, 720 it (after pre-training on 96,000 images, not drawn)" in _legend_texts(fig)
    for r in runs:  # a pre-training short enough to draw: the pretrained curves start after it
        r.records[:] = [{**x, "pretrain_images_seen": 4 * 300} if "pretrain_images_seen" in x else x for x in r.records]
    fig = curves_figure(runs, pretrain_offset=True)
    firsts = sorted(line.get_xdata()[0] for line in fig.axes[0].lines if line.get_marker() in ("o", "s"))
    assert firsts == [120, 240, 120 + 300, 240 + 300]


def test_an_unfinished_seed_does_not_hide_the_finished_ones_last_evaluation(grid):
    import yaml

    from scratchdet.analysis.report import curves_figure, load_runs

    shutil.copytree(grid / "rand_720_600", grid / "rand_720_600_s1")
    lines = (grid / "rand_720_600_s1" / "metrics.jsonl").read_text().splitlines()
    (grid / "rand_720_600_s1" / "metrics.jsonl").write_text("\n".join(lines[:-2]) + "\n")  # killed before 720
    for name, seed in (("rand_720_600", 0), ("rand_720_600_s1", 1)):
        cfg = yaml.safe_load((grid / name / "config.yaml").read_text())
        (grid / name / "config.yaml").write_text(yaml.safe_dump({**cfg, "train": {"seed": seed}}))
    ax = curves_figure(load_runs([grid])).axes[2]
    solid = [line for line in ax.lines if line.get_marker() in ("o", "s") and line.get_linestyle() == "-"]  # random init
    assert sorted(max(line.get_xdata()) for line in solid) == [360, 720]  # the 720-it arm still reaches 720


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
    assert "2 schedule length(s); the power law needs 3: no prediction" in page
    # Without intervals a large gain is still read: 360 -> 720 it at 600 images adds 3.6 AP.
    assert "data size: 600 images, box AP: NOT levelled off (last doubling adds 3.60" in page
    assert page.count("data:image/png;base64,") == 2  # Fig. 1 and the seen bars only
    assert (out / "findings.txt").read_text().startswith(
        "== Answer: does random init catch up with pretrained?\n- (not answered)")
    assert (out / "tables" / "catch_up.csv").is_file() and (out / "tables" / "plateau.csv").is_file()


def test_ap_best_reads_the_best_evaluation_and_gives_no_interval_it_cannot_back(grid, tmp_path):
    # Presets that say "report each arm's best evaluation": the AP falls after its peak in rand_720_600, whose
    # final evaluation alone holds per-image matches, so best mode reads the peak and drops the interval.
    import json

    from scratchdet.analysis.report import load_runs, study_points
    from scratchdet.config import ConfigError

    path = grid / "rand_720_600" / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[-1]["bbox/AP"] = 1.0  # the final box AP falls under the evaluation before it (27.2)
    lines.append({"iteration": 720, "matches": {"bbox": {"dummy": 1}, "segm": {"dummy": 1}}})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    final = {p.name: p for p in study_points(load_runs([grid]))}
    best = {p.name: p for p in study_points(load_runs([grid]), "best")}
    assert final["rand_720_600"].ap["bbox"] == 1.0 and best["rand_720_600"].ap["bbox"] == 27.2
    # One evaluation, the best by box AP (iteration 480): mask AP and images seen are read there too.
    assert best["rand_720_600"].ap["segm"] == 26.2 and final["rand_720_600"].ap["segm"] == 36.2
    assert best["rand_720_600"].images == 4 * 480 and final["rand_720_600"].images == 4 * 720
    assert best["rand_720_600"].matches is None and set(final["rand_720_600"].matches) == {"bbox", "segm"}
    assert "best evaluation (iteration 480) is not its final one" in best["rand_720_600"].matches_note
    assert best["pre_720_600"].ap == final["pre_720_600"].ap  # rising curves: the best is the final
    with pytest.raises(ConfigError, match="--ap"):
        study_points(load_runs([grid]), "last")
    path.write_text("".join(json.dumps(x) + "\n" for x in lines[:-1]))  # the page, without the stand-in matches
    out = tmp_path / "report"
    assert main(["report", str(grid), "--out", str(out), "--ap", "best"]) == 0
    page = (out / "index.html").read_text()
    assert "Findings read each run's best evaluation (report --ap best)" in page
    assert "data size: 600 images, box AP" in page and "fits of best AP" not in page  # 2 lengths: no fit


def test_runs_table_gives_precision_and_own_training_time_and_the_page_shows_notes(tmp_path):
    import json

    import yaml

    def write(name, config, records):
        d = tmp_path / "study" / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    base = {"solver": {"max_iter": 40, "steps": [30], "ims_per_batch": 4, "warmup_iters": 1}, "model": {"init": "random"}}
    line = lambda it, t, **k: {"iteration": it, "loss": 1.0, "lr": 0.1, "images_seen": 4 * it, "time_per_iter": t, **k}  # noqa: E731
    ev = lambda it: {"iteration": it, "bbox/AP": 10.0, "segm/AP": 9.0}  # noqa: E731
    write("trunk", {**base, "train": {"amp": "off"}}, [line(20, 0.5), ev(20), line(40, 0.25), ev(40)])
    # A branch: its first line is the trunk's (copied, marked), its own tail 10 iterations at 1 s.
    branch = {**base, "solver": {**base["solver"], "max_iter": 30, "steps": [25]}, "train": {"amp": "auto"}}
    write("branch", branch, [line(20, 0.5, branched_from="trunk"), ev(20) | {"branched_from": "trunk"},
                             line(30, 1.0), ev(30)])
    notes = tmp_path / "notes.txt"
    notes.write_text("Measured wall time: 53 min in fp32.\n\nSecond <caveat>.\n")
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "study"), "--out", str(out), "--notes", str(notes)]) == 0
    rows = _rows(out / "tables" / "runs.csv")
    assert rows["trunk"]["precision"] == "fp32" and float(rows["trunk"]["training time (min)"]) == pytest.approx(
        (20 * 0.5 + 20 * 0.25) / 60, abs=0.01)
    assert rows["branch"]["precision"].startswith("auto") and float(rows["branch"]["training time (min)"]) == \
        pytest.approx(10 * 1.0 / 60, abs=0.01)
    page = (out / "index.html").read_text()
    assert "<h2>Notes</h2><p>Measured wall time: 53 min in fp32.</p><p>Second &lt;caveat&gt;.</p>" in page
    assert "training steps logged by the runs: 0.4 min in all" in page
