"""Evaluation/report.py: the paper-style summary table, both EERs, metric directions, and the
report's presentation (one precision for mean ± std, shared pose axes, DET tick labels that do
not overlap, square thumbnails, short plot file names, notes instead of empty plots)."""

from __future__ import annotations

import html
import io
import re

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

import evaluate
import grids
import metrics
import report
from fileio import atomic_write_bytes


def verification(seed: int, separation: float) -> dict:
    """verification_metrics of random genuine / impostor scores."""
    rng = np.random.default_rng(seed)
    return metrics.verification_metrics(rng.normal(separation, 0.1, 30), rng.normal(0, 0.1, 200))


def pose_set(yaw_std_mean: float) -> dict:
    """The fields of a pose set entry the summary and the pose table read."""
    spread = {"mean": yaw_std_mean, "std": 1.0}
    return {
        "n_images": 4,
        "n_no_face": 0,
        "n_unreadable": 0,
        "n_faces": 4,
        "n_identities": 2,
        "all_faces": {angle: {"mean": 0.5, "std": 9.0} for angle in report.ANGLES},
        **{angle: spread for angle in report.ANGLES},
    }


@pytest.fixture
def results() -> dict:
    """Two generated sets and the real set, with identity, pose and quality numbers."""
    names = ("A", "B", "real")
    return {
        "embedder": "test",
        "config": {},
        "definitions": metrics.definitions_with_directions(),
        "sets": {
            name: {
                "role": "real" if name == "real" else "generated",
                "root": f"/data/{name}",
                "n_identities": 2,
                "n_images": 4,
                "n_with_face": 4,
                "n_no_face": 0,
                "n_unreadable": 0,
            }
            for name in names
        },
        "identity": {
            "synthetic_vs_synthetic": {"A": verification(0, 0.5), "B": verification(1, 0.2)},
            "synthetic_vs_real": {"A": verification(2, 0.3), "B": {"skipped": "no faces"}},
            "real_vs_real": {"real": verification(3, 0.9)},
        },
        "diversity": {"skipped": "no --feature_model"},
        "fidelity": {"skipped": "no --feature_model"},
        "pose": {
            "estimator": "dlib-hog68-pnp14",
            "comparable_with_paper": False,
            "sets": {"A": pose_set(3.0), "B": pose_set(7.0), "real": pose_set(20.0)},
        },
        "quality": {
            "model": "crfiqa-r50-x-aligned-bgr",
            "weights": "32572backbone.pth",
            "setting": "paper",
            "setting_description": "the paper's",
            "sets": {
                name: {"n_images": 4, "n_no_face": 0, "n_unreadable": 0, "n": 4, "mean": value,
                       "std": 0.1, "median": value}
                for name, value in (("A", 1.5), ("B", 2.5), ("real", 9.0))
            },
        },
    }  # fmt: skip


def cell_texts(row_html: str) -> list[str]:
    return [html.unescape(cell) for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row_html)]


def test_summary_table_comes_first_with_arrows_and_the_best_generated_value_marked(results):
    headers, rows, best = report.summary_table(results)
    assert headers[:3] == [
        "EER within set (pyeer) ↓",
        "FDR within set ↑",
        "EER vs real (pyeer) ↓",
    ]
    assert "yaw std per identity ↑" in headers and headers[-1] == "CR-FIQA ↑"
    assert not {"Vendi ↑", "FD ↓", "precision ↑"} & set(headers)  # not computed: left out
    eer = headers.index("EER within set (pyeer) ↓")
    identity = results["identity"]
    assert rows[0][eer] == identity["synthetic_vs_synthetic"]["A"]["eer_fvc2000"]
    assert rows[2][eer] == identity["real_vs_real"]["real"]["eer_fvc2000"]  # real: reference
    assert best[eer] == {0}  # A separates better (lower EER); real is not ranked
    assert best[headers.index("yaw std per identity ↑")] == {1}  # B: 7 > 3 (real's 20 unranked)
    assert best[headers.index("CR-FIQA ↑")] == {1}
    assert rows[1][headers.index("EER vs real (pyeer) ↓")] is None  # B skipped: blank
    page = report.render_report(results, {})
    first_heading = re.search(r"<h2>(.*?)</h2>", page).group(1)
    assert first_heading == "Summary (the paper's columns)"
    summary = page[page.index('<table class="summary">') :]
    summary = summary[: summary.index("</table>")]
    b_row = cell_texts(summary.split("<tr>")[3])
    assert b_row[0] == "B" and b_row[headers.index("CR-FIQA ↑") + 1] == "<b>2.5</b>"
    # The fixture's pose is dlib-PnP's: the summary says so; its quality is the paper's setting.
    caption = page[page.index("<h2>Summary") : page.index('<table class="summary">')]
    assert "pose from the dlib-PnP fallback, not comparable with the paper" in caption
    assert "CR-FIQA in setting" not in caption


def test_summary_ties_as_printed_are_all_bold_and_other_settings_are_named(results):
    """Values that print the same (9.748177 and 9.748287 both show 9.748) are equally best."""
    results["quality"]["sets"]["A"]["mean"] = 2.5000001
    results["quality"]["setting"] = "crfiqa-rgb"
    results["pose"]["comparable_with_paper"] = True
    headers, _, best = report.summary_table(results)
    assert report.format_value(2.5000001) == report.format_value(2.5)
    assert best[headers.index("CR-FIQA ↑")] == {0, 1}
    page = report.render_report(results, {})
    caption = page[page.index("<h2>Summary") : page.index('<table class="summary">')]
    assert "CR-FIQA in setting crfiqa-rgb, not the paper's" in html.unescape(caption)
    assert "dlib-PnP" not in caption


def test_both_eers_are_shown_and_the_papers_is_named(results):
    header, rows = report.verification_rows(results["identity"]["synthetic_vs_synthetic"])
    labels = {row[0]: row[1:] for row in rows}
    entry = results["identity"]["synthetic_vs_synthetic"]["A"]
    assert labels["EER ↓ (pyeer / FVC2000: the paper's)"][0] == entry["eer_fvc2000"]
    assert labels["EER ↓ (interpolated ROC crossing)"][0] == entry["eer"]
    assert entry["eer"] != entry["eer_fvc2000"]  # at 30 genuine pairs the two differ


def test_every_ranked_metric_says_its_direction(results):
    definitions = metrics.definitions_with_directions()
    for metric, direction in metrics.METRIC_DIRECTIONS.items():
        assert definitions[metric].startswith(f"{metrics.ARROWS[direction]} {direction} is better")
    assert not definitions["roc"].startswith(("↑", "↓"))  # not a ranked number
    page = report.render_report(results, {})
    for label in ("AUC ↑", "FDR ↑", "decidability d' ↑", "FNMR @ FMR=0.01 ↓", "CR-FIQA ↑ mean"):
        assert html.escape(label) in page
    assert report.FIDELITY_HEADER[1:3] == ["FD ↓", "KD ↓ mean ± std"]


def test_pose_table_is_the_papers_and_names_the_estimator(results):
    page = report.pose_section(results["pose"], {})
    assert "yaw mean ± std, all faces" in page and "roll std per identity ↑" in page
    assert "0.500 ± 9.000" in page and "not comparable with the paper" in page
    results["pose"]["comparable_with_paper"] = True
    assert "the paper's estimator and crop" in report.pose_section(results["pose"], {})


@pytest.mark.parametrize(
    ("mean", "std", "text"),
    [
        (1.0, 0.25, "1.000 ± 0.250"),
        (0.01234, 0.5, "0.0123 ± 0.5000"),
        (123.456, 7.1, "123.5 ± 7.1"),
        (-2.5, 0.001, "-2.500 ± 0.001"),
        (1.5, float("nan"), "1.5 ± n/a"),
        (float("nan"), 1.0, "n/a"),
        (2e-7, 1e-7, "2.000e-07 ± 1.000e-07"),
    ],
)
def test_mean_and_std_share_one_precision(mean, std, text):
    assert report.mean_std_text(mean, std) == text


def test_pose_scatters_of_all_sets_share_one_axis_range():
    narrow = np.array([[1.0, -2.0, 0.0], [-3.0, 1.0, 0.0]])
    broad = np.array([[44.0, 12.0, 0.0], [-20.0, -18.0, 0.0]])
    limits = report.pose_axis_limits([narrow, broad])
    assert limits == (50.0, 20.0)
    for angles in (narrow, broad):
        figure = report.pose_scatter_figure(angles, ["a", "b"], "set", limits)
        assert figure.axes[0].get_xlim() == (-50.0, 50.0)
        assert figure.axes[0].get_ylim() == (-20.0, 20.0)


def test_a_set_without_faces_gets_a_note_not_empty_axes():
    pose = {"sets": {"A": {}, "empty": {}}}
    angles = {"A": (np.array([[5.0, 2.0, 0.0]]), ["p"]), "empty": (np.zeros((0, 3)), [])}
    figures = evaluate.pose_figures(pose, angles)
    assert list(figures) == ["pose_A"]
    assert pose["sets"]["empty"]["figure_note"] == "no face found: no pose to plot"
    quality = {"sets": {}}
    assert evaluate.quality_figures(quality, {"A": np.zeros(0)}) == {}
    assert "no histogram" in quality["figure_note"]


@pytest.mark.parametrize("figsize", [(4.8, 3.8), (3.3, 2.6)])  # the report's and a paper column's
def test_det_tick_labels_do_not_overlap(figsize):
    rng = np.random.default_rng(0)
    roc = metrics.roc_curve(rng.normal(0.6, 0.1, 3000), rng.normal(0.0, 0.1, 1_000_000))
    figure = report.det_figure({"A": roc}, "DET", figsize=figsize)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ticks in (figure.axes[0].xaxis, figure.axes[0].yaxis):
        shown = [label for label in ticks.get_ticklabels() if label.get_visible()]
        boxes = [label.get_window_extent(renderer) for label in shown]
        assert len(shown) >= 5
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert "0.5" in [label.get_text() for label in figure.axes[0].get_xticklabels()]


def test_generated_and_real_thumbnails_have_one_size(tmp_path):
    generated, real = tmp_path / "gen.png", tmp_path / "real.jpg"
    Image.new("RGB", (512, 512), (200, 10, 10)).save(generated)
    Image.new("RGB", (80, 120), (10, 200, 10)).save(real)  # smaller and not square
    sizes = {Image.open(io.BytesIO(grids.thumbnail_jpeg(path))).size for path in (generated, real)}
    assert sizes == {(grids.THUMBNAIL_SIZE, grids.THUMBNAIL_SIZE)}


def test_banner_wraps_and_definitions_are_left_aligned(results):
    page = report.render_report(results | {"banner": "x" * 400}, {})
    banner_rule = re.search(r"\.banner\{[^}]*\}", report.STYLE).group(0)
    assert "overflow-wrap:anywhere" in banner_rule
    assert "table.text td{text-align:left}" in report.STYLE
    definitions = page[page.index("<h2>Definitions</h2>") :]
    assert definitions.split("\n")[1].startswith('<table class="text">')


def test_long_set_names_give_short_distinct_plot_files(tmp_path):
    """A 240-character method name is a legal folder name; its plot (and the temp file it is
    written through) must still fit the 255-byte file-name limit."""
    long_a, long_b = "m" * 240, "m" * 239 + "n"
    for prefix in ("pose", "training"):
        keys = evaluate.figure_keys(prefix, [long_a, long_b, "short"])
        assert len(set(keys.values())) == 3 and keys["short"] == f"{prefix}_short"
        for key in keys.values():
            assert len(key) <= 100
            atomic_write_bytes(tmp_path / "plots" / f"{key}.png", b"png")
    assert len(list((tmp_path / "plots").iterdir())) == 6
