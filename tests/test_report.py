"""The report: its building blocks, the page the smoke run writes, Snakemake's own report, and the
page in a real (headless) browser."""

from __future__ import annotations

import base64
import io
import os
import re
import statistics
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, snakemake
from convviz.config import validate_config
from convviz.report import ReportInputs, build_report
from convviz.report.html import markdown, markdown_sections, mean_std
from convviz.report.sections import SECTIONS, table1, timings, transfer_by_layer, transfer_by_shots
from convviz.report.units import choose_channels, model_units, tile_grid

SECTION_IDS = [s.id for s in SECTIONS]
STUDIES = ["top9", "evolution", "invariance", "compare", "occlusion", "correspondence", "transfer"]


def decode_png(uri: str) -> np.ndarray:
    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def config_with(**report) -> dict:
    config = {"models": ["lenet"], "report": report}
    return validate_config(config)


# ---------------------------------------------------------------------------------- building blocks


def test_markdown_renders_the_readme_subset():
    text = "Intro `code` and **bold**.\n\n| a | b |\n|---|---|\n| 1 | <x> |\n\n```bash\nmake report\n```\n- one\n- two\n"
    out = markdown(text)
    assert "<code>code</code>" in out and "<strong>bold</strong>" in out
    assert out.count("<tr>") == 2 and "<td>&lt;x&gt;</td>" in out  # header + one row, cells escaped
    assert "<pre><code>make report</code></pre>" in out
    assert out.count("<li>") == 2


def test_markdown_sections_take_matching_headings_with_their_subsections():
    text = "## Intro\nno\n## Measured on CPU\nyes\n### Detail\nalso\n## Tests\nno\n## Benchmarks\nb\n"
    found = markdown_sections(text, r"measured|benchmark")
    assert [h for h, _ in found] == ["Measured on CPU", "Benchmarks"]
    assert "also" in found[0][1] and "no" not in found[0][1]


def test_table1_puts_the_papers_numbers_beside_ours():
    rows = []
    for occluder, base in (("right_eye", 0.05), ("random", 0.1)):
        for draw in range(3):
            rows += [
                {"model": "alexnet", "layer": "conv5", "occluder": occluder, "draw": draw, "delta": base + 0.01 * draw},
                {"model": "alexnet", "layer": "fc7", "occluder": occluder, "draw": draw, "delta": base / 2 + 0.02 * draw},
            ]
    out = table1(pd.DataFrame(rows), "alexnet", "conv5", "fc7").set_index("occluder")
    expected = [0.05, 0.06, 0.07]
    assert out.loc["right_eye", "ours: conv5"] == f"{statistics.mean(expected):.3f} ± {statistics.stdev(expected):.3f}"
    assert out.loc["right_eye", "paper: layer 5"] == "0.067 ± 0.007"
    assert out.loc["random", "paper: layer 7"] == "0.073 ± 0.014"
    assert mean_std([0.2]) == "0.200" and mean_std([]) == "—"


def transfer_rows(target: str) -> pd.DataFrame:
    rows = []
    for split, (soft, scratch) in enumerate([(0.80, 0.20), (0.90, 0.30), (0.85, 0.25)]):
        for n, bump in ((15, 0.0), (30, 0.05)):
            rows += [
                ("zfnet", target, "softmax", "fc7", n, split, "mean_class_accuracy", soft + bump),
                ("zfnet", target, "scratch", "all", n, split, "mean_class_accuracy", scratch + bump),
                ("zfnet", target, "softmax", "fc7", n, split, "train_images", 300.0),
            ]
        rows += [("zfnet", target, "svm", layer, 30, split, "mean_class_accuracy", 0.5) for layer in ("conv1", "fc7")]
        rows += [("zfnet", target, "softmax", "conv1", 30, split, "mean_class_accuracy", 0.4)]
    return pd.DataFrame(rows, columns=["model", "target", "probe", "layer", "n_per_class", "split", "metric", "value"])


def test_transfer_tables_show_ours_over_splits_beside_the_papers():
    df = transfer_rows("caltech101")
    shots = transfer_by_shots(df, "caltech101", ["zfnet"], {"zfnet": "fc7"}, best="zfnet")
    ours, theirs = shots[~shots["model"].str.startswith("paper")], shots[shots["model"].str.startswith("paper")]
    frozen = ours.set_index("method").loc["frozen features: softmax on fc7"]
    values = [80.0, 90.0, 85.0]  # the three splits at N=15
    assert frozen["model"] == "zfnet ★"
    assert frozen["15 / class"] == f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    assert frozen["30 / class"].startswith("90.0")
    assert ours.set_index("method").loc["trained from scratch", "15 / class"].startswith("25.0")
    assert theirs.set_index("method").loc["ImageNet-pretrained, softmax on layer 7", "30 / class"] == "86.5 ± 0.5"  # Table 4
    assert theirs.set_index("method").loc["trained from scratch", "15 / class"] == "22.8 ± 1.5"
    by_layer = transfer_by_layer(df, "caltech101", "zfnet", ["conv1", "conv2", "fc7"]).set_index("")
    assert list(by_layer.columns) == ["conv1", "fc7"]
    assert by_layer.loc["ours: svm, 30 / class", "conv1"].startswith("50.0")
    assert by_layer.loc["ours: softmax, 30 / class", "fc7"].startswith("90.0")  # the penultimate softmax row
    assert by_layer.loc["paper: svm, 30 / class", "conv1"] == "44.8"  # Table 7
    # A target the paper did not use gets no paper rows.
    other = transfer_by_shots(transfer_rows("synthetic_target"), "synthetic_target", ["zfnet"], {"zfnet": "fc7"}, best=None)
    assert not other["model"].str.startswith("paper").any()


def test_tile_grid_places_tiles_in_reading_order():
    tiles = np.stack([np.full((3, 4, 4), 10 * k, np.uint8) for k in range(9)])
    grid = tile_grid(tiles, tile_px=4)
    assert grid.shape == (3 * 4 + 2, 3 * 4 + 2, 3)
    for k in range(9):
        r, c = divmod(k, 3)
        assert (grid[r * 5 : r * 5 + 4, c * 5 : c * 5 + 4] == 10 * k).all()
    assert (grid[4, :] == 255).all()  # the gap line
    assert tile_grid(np.zeros((9, 3, 64, 64), np.uint8), tile_px=16).shape == (3 * 16 + 2, 3 * 16 + 2, 3)


def test_choose_channels_keeps_evolution_maps_and_caps_the_rest():
    channels = list(range(100))
    picked = choose_channels(channels, first=[97, 3], k=10, seed=0, salt="x")
    assert len(picked) == 10 and {3, 97} <= set(picked) and picked == sorted(picked)
    assert picked == choose_channels(channels, first=[97, 3], k=10, seed=0, salt="x")  # seeded
    assert choose_channels(channels, first=[], k="all", seed=0, salt="x") == channels


def test_unit_data_hold_the_npz_projections_exactly(tmp_path):
    rng = np.random.default_rng(0)
    projections = rng.integers(0, 256, (5, 9, 3, 8, 8), dtype=np.uint8)
    patches = rng.integers(0, 256, (5, 9, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "top9_arrays.npz", conv1__channels=np.array([0, 2, 4, 6, 8]), conv1__projections=projections, conv1__patches=patches)
    top9 = pd.DataFrame(
        [{"layer": "conv1", "channel": 4, "rank": r, "image_id": f"img{r}", "activation": 9.0 - r, "y": 1, "x": 2} for r in range(9)]
    )
    evolution = pd.DataFrame(
        [{"layer": "conv1", "channel": 6, "epoch": e, "image_id": "a", "activation": float(e), "y": 0, "x": 0} for e in (1, 2, 5)]
    )
    data = model_units("lenet", tmp_path / "top9_arrays.npz", top9, evolution, units_per_layer=3, tile_px=32, colours=0)
    layer = data["layers"][0]
    assert layer["name"] == "conv1" and layer["total"] == 5 and len(layer["channels"]) == 3 and 6 in layer["channels"]
    for channel in layer["channels"]:
        i = [0, 2, 4, 6, 8].index(channel)
        unit = layer["units"][str(channel)]
        assert (decode_png(unit["projections"]) == tile_grid(projections[i], 32)).all()
        assert (decode_png(unit["patches"]) == tile_grid(patches[i], 32)).all()
    assert layer["units"]["6"]["evolution"] == {"epochs": [1, 2, 5], "activation": [1.0, 2.0, 5.0]}
    if "4" in layer["units"]:
        assert [row[1] for row in layer["units"]["4"]["top9"]] == [f"img{r}" for r in range(9)]


def test_unit_evolution_strip_holds_the_evolution_projections_by_epoch(tmp_path):
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 256, (2, 9, 3, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "top9_arrays.npz", conv2__channels=np.array([3, 7]), conv2__projections=tiles, conv2__patches=tiles)
    evolution = rng.integers(0, 256, (1, 4, 3, 6, 6), dtype=np.uint8)  # [maps, epochs, 3, R, R]
    np.savez(tmp_path / "evolution_arrays.npz", epochs=np.array([1, 2, 5, 10]), conv2__channels=np.array([7]), conv2__projections=evolution)
    data = model_units("zfnet", tmp_path / "top9_arrays.npz", evolution_npz=tmp_path / "evolution_arrays.npz", tile_px=32, colours=0)
    units = data["layers"][0]["units"]
    assert "evolution" not in units["3"]
    assert units["7"]["evolution"]["image_epochs"] == [1, 2, 5, 10]
    assert (decode_png(units["7"]["evolution"]["image"]) == tile_grid(evolution[0], 32, columns=4)).all()


def test_timings_read_snakemake_benchmark_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # benchmark paths are relative to the workflow directory
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    path = Path("results/benchmarks/train/lenet.tsv")
    path.parent.mkdir(parents=True)
    path.write_text(header + "12.5\t0:00:12\t300.0\t1\t1\t1\t0\t0\t95.0\t11.0\n")
    nested = Path("results/benchmarks/transfer/caltech101/zfnet.tsv")
    nested.parent.mkdir(parents=True)
    nested.write_text(header + "2.0\t0:00:02\t100.0\t1\t1\t1\t0\t0\t50.0\t1.0\n3.0\t0:00:03\t100.0\t1\t1\t1\t0\t0\t50.0\t2.0\n")
    out = timings([path, nested])
    assert list(out["step"]) == ["train", "transfer"] and list(out["job"]) == ["lenet", "caltech101/zfnet"]
    assert out.loc[0, "wall (s)"] == 12.5 and out.loc[0, "CPU (s)"] == 11.0
    assert out.loc[1, "wall (s)"] == 2.5  # repeated measurements (benchmark repeats) are averaged


def test_the_report_reads_only_its_inputs(tmp_path, monkeypatch):
    """A figure left in results/ by an earlier config never appears; absent studies get a note."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    stale = Path("results/invariance/lenet/invariance.png")
    stale.parent.mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(stale)
    curves = Path("results/models/lenet/training_curves.png")
    curves.parent.mkdir(parents=True)
    Image.new("RGB", (40, 30), (0, 0, 255)).save(curves)
    inputs = ReportInputs(files=[str(curves)], models=["lenet"])
    result = build_report(inputs, config_with(), "results/report/index.html", software={"python": "3"}, log=lambda m: None)
    page = Path("results/report/index.html").read_text()
    assert "training" in result["sections"]
    assert {"invariance", "transfer", "top9"} <= set(result["absent"])
    assert 'id="invariance" class="report-section absent"' in page and "Left out:" in page
    assert page.count("<img ") == 1  # the training curves, not the stale invariance figure


# ------------------------------------------------------------------------------ the smoke run's page


def present_studies(workdir: Path) -> list[str]:
    return [s for s in STUDIES if (workdir / "results" / s).is_dir()]


@pytest.mark.workflow
def test_smoke_report_is_self_contained_and_complete(smoke_run):
    page = (smoke_run / "results/report/index.html").read_text()
    # Offline: nothing loaded from elsewhere, every image embedded.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<link" not in page and "@import" not in page
    sources = re.findall(r"""<img [^>]*src="([^"]+)\"""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    for section in SECTION_IDS:
        assert f'id="{section}"' in page
    absent = set(re.findall(r'id="([\w-]+)" class="report-section absent"', page))
    assert not absent & {"setup", "training", "benchmarks", "timings"}
    for study in present_studies(smoke_run):
        assert study not in absent, f"{study} ran in the smoke run but its section is left out"
    models = yaml.safe_load((smoke_run / "configs/smoke.yaml").read_text()).get("models") or ["lenet", "alexnet", "zfnet", "resnet50"]
    for model in models:
        assert f'data-model="{model}"' in page or "top9" in absent
    # Every step's benchmark files are in the timings table.
    timings_html = page[page.index('id="timings"') :]
    for step in (smoke_run / "results/benchmarks").iterdir():
        if step.is_dir() and step.name != "report":
            assert f"<td>{step.name}</td>" in timings_html
    assert "done:" in (smoke_run / "results/logs/report/report.log").read_text()


@pytest.mark.workflow
def test_snakemake_report_zip_contains_the_captioned_outputs(smoke_run, tmp_path):
    target = tmp_path / "report.zip"
    snakemake(smoke_run, "--report", str(target), "--configfile", "configs/smoke.yaml")
    with zipfile.ZipFile(target) as archive:
        names = archive.namelist()
    assert "report/report.html" in names  # Snakemake's own browsable report
    assert sum(n.endswith("/training_curves.png") for n in names) == len(list(smoke_run.glob("results/models/*/training_curves.png")))
    assert any(n.endswith("/index.html") for n in names)  # our page, with its caption


@pytest.mark.workflow
def test_editing_the_report_settings_reruns_only_the_report(smoke_run):
    (smoke_run / "edit_report.yaml").write_text("report:\n  unit_tile_px: 16\n")
    out = snakemake(smoke_run, "-n", "--configfile", "configs/smoke.yaml", "edit_report.yaml").stdout
    rules = set(re.findall(r"^(?:local)?rule (\w+):", out, re.M))
    assert rules == {"report", "all"} or rules == {"report"}


# ------------------------------------------------------------------------------------- in a browser

BROKEN_IMAGES = """(async () => {
  document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; });
  document.querySelectorAll('details').forEach(d => { d.open = true; });
  await Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)));
  return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
})()"""

UNIT_VIEW = """(async () => {
  const imgs = Array.from(document.querySelectorAll('#ub-view img'));
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return {title: document.getElementById('ub-title').textContent,
          srcs: imgs.map(i => i.src), ok: imgs.every(i => i.complete && i.naturalWidth > 0)};
})()"""


ABSENT = "Array.from(document.querySelectorAll('section.absent')).map(s => s.id)"

PICK_FOR_SCREENSHOT = """(() => {
  const m = document.getElementById('ub-model'); m.selectedIndex = 0; m.dispatchEvent(new Event('change'));
  const l = document.getElementById('ub-layer'); l.selectedIndex = Math.floor(l.options.length / 2);
  l.dispatchEvent(new Event('change'));
  return [m.value, l.value];
})()"""


def chromium_or_skip() -> str:
    from headless import find_chromium

    executable = find_chromium()
    if executable is None:
        if os.environ.get("CONVVIZ_REQUIRE_BROWSER"):
            pytest.fail("CONVVIZ_REQUIRE_BROWSER is set but no Chromium is installed (apt-get install chromium)")
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    pytest.importorskip("websocket", reason="websocket-client is not installed (pip install -r requirements-dev.txt)")
    return executable


@pytest.mark.browser
@pytest.mark.workflow
def test_report_in_headless_chromium(smoke_run):
    from headless import Browser

    executable = chromium_or_skip()
    page = smoke_run / "results/report/index.html"
    shots = ROOT / "results/report"
    with Browser(executable, width=1400, height=1000) as browser:
        browser.open(page.resolve().as_uri())
        ids = browser.evaluate("Array.from(document.querySelectorAll('section.report-section')).map(s => s.id)")
        assert ids == SECTION_IDS  # every section, in the paper's order
        toc = browser.evaluate("Array.from(document.querySelectorAll('#toc a')).map(a => a.getAttribute('href'))")
        assert toc == [f"#{s}" for s in SECTION_IDS]
        assert browser.evaluate(BROKEN_IMAGES) == []  # also decodes every image for the screenshots
        browser.evaluate("window.scrollTo(0, 0)")
        browser.screenshot(shots / "screenshot-smoke.png")
        if "unit-browser-section" in browser.evaluate(ABSENT):
            assert browser.errors() == []
            pytest.skip("no top-9 projections in this run, so no unit browser to test")

        # The unit browser shows a feature map and switches to the next ones (two dead units of a
        # barely trained smoke model can look alike, so some step, not every step, changes images).
        previous = browser.evaluate(UNIT_VIEW)
        assert previous["ok"] and len(previous["srcs"]) >= 2
        images_changed = False
        for _ in range(5):
            browser.evaluate("document.getElementById('ub-next').click()")
            view = browser.evaluate(UNIT_VIEW)
            assert view["ok"] and view["title"] != previous["title"]
            images_changed |= view["srcs"][:2] != previous["srcs"][:2]
            previous = view
        assert images_changed
        models = browser.evaluate("Array.from(document.getElementById('ub-model').options).map(o => o.value)")
        seen = set()
        for model in models:
            layers = browser.evaluate(
                f"(() => {{ const s = document.getElementById('ub-model'); s.value = '{model}';"
                " s.dispatchEvent(new Event('change'));"
                " return Array.from(document.getElementById('ub-layer').options).map(o => o.value); })()"
            )
            for layer in layers:
                browser.evaluate(
                    f"(() => {{ const s = document.getElementById('ub-layer'); s.value = '{layer}';"
                    " s.dispatchEvent(new Event('change')); })()"
                )
                view = browser.evaluate(UNIT_VIEW)
                assert view["ok"], f"{model}/{layer}: a unit image did not decode"
                assert view["title"].startswith(f"{model} · {layer} ·")
                seen.add(tuple(view["srcs"][:2]))
        assert len(seen) > 1  # the images follow the chosen model and layer
        # The screenshot shows a mid-level layer of the first model, like the paper's Fig. 2 rows.
        model, layer = browser.evaluate(PICK_FOR_SCREENSHOT)
        view = browser.evaluate(UNIT_VIEW)
        assert view["ok"] and view["title"].startswith(f"{model} · {layer} ·")
        browser.evaluate("document.getElementById('unit-browser-section').scrollIntoView()")
        browser.screenshot(shots / "screenshot-smoke-units.png")
        assert browser.errors() == []
