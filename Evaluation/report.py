"""Plots (matplotlib, no pyplot state) and the self-contained HTML report of evaluate.py.

Figures are built with `matplotlib.figure.Figure`, so they work the same in a headless
script and in a notebook; `figure_png` turns one into PNG bytes that the report embeds as
base64 (no external files needed to read the report).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Mapping

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.text import Text

from metrics import METRIC_DIRECTIONS, RocCurve, arrow

DET_TICKS_ABOVE_1E2 = (0.05, 0.2, 0.5, 0.8, 0.95)  # below 0.01 the DET ticks every decade
DET_TOP = 0.95  # upper end of both DET axes
ZERO_AT_MOST = 0.01  # tiny sets: rates of 0 still drawn at 1%, below all their other rates
NOT_AVAILABLE = "n/a"  # a NaN statistic in a table, e.g. the mean over zero faces


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure, every text in it plain (see plain_text)."""
    buffer = io.BytesIO()
    with matplotlib.rc_context({"text.parse_math": False}):  # texts created while drawing
        plain_text(figure).savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def plain_text(figure: Figure) -> Figure:
    """The figure with all its texts plain: labels come from folder names, flags and
    TensorBoard tags, where '$...$' is part of a name, not matplotlib math to typeset."""
    for text in figure.findobj(Text):
        text.set_parse_math(False)
    return figure


def score_histogram_figure(
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    thresholds: Mapping[str, float] | None = None,
    title: str = "",
) -> Figure:
    """One panel per method: genuine vs impostor score densities (+ EER threshold line)."""
    figure = Figure(figsize=(4.2 * len(scores), 3.2), layout="constrained")
    axes = figure.subplots(1, len(scores), squeeze=False)[0]
    every = np.concatenate([np.concatenate(pair) for pair in scores.values()])
    bins = np.linspace(every.min(), every.max(), 51) if every.size else 50
    for axis, (method, (genuine, impostor)) in zip(axes, scores.items(), strict=True):
        axis.hist(impostor, bins=bins, density=True, alpha=0.55, color="tab:red", label="impostor")
        axis.hist(genuine, bins=bins, density=True, alpha=0.55, color="tab:blue", label="genuine")
        if thresholds and method in thresholds:
            axis.axvline(thresholds[method], color="k", linestyle="--", label="EER threshold")
        axis.set_title(f"{method} (G={len(genuine)}, I={len(impostor)})", fontsize=9)
        axis.set_xlabel("cosine similarity")
        axis.legend(fontsize=7)
    axes[0].set_ylabel("density")
    figure.suptitle(title)
    return figure


def zero_position(rocs: Mapping[str, RocCurve], rate: str) -> float:
    """Where a rate of 0 is drawn on a log / probit axis: half the finest step any curve has,
    0.5 / the most impostor pairs (rate 'fmr') or genuine pairs ('fnmr'); at most ZERO_AT_MOST.
    """
    pairs = max(roc.n_impostor if rate == "fmr" else roc.n_genuine for roc in rocs.values())
    return min(0.5 / pairs, ZERO_AT_MOST)


def _drop_inner_points(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The polyline without the inner points of its horizontal and vertical runs, which lie on
    the segment between the run's ends on any axis scale (drawing stays the same)."""
    inner = np.zeros(x.size, dtype=bool)
    inner[1:-1] = ((x[:-2] == x[1:-1]) & (x[1:-1] == x[2:])) | (
        (y[:-2] == y[1:-1]) & (y[1:-1] == y[2:])
    )
    return x[~inner], y[~inner]


def curve_vertices(roc: RocCurve, stop_at_zero_fnmr: bool) -> tuple[np.ndarray, np.ndarray]:
    """(FMR, FNMR) vertices to draw: from the last one with FMR = 0 (the earlier ones have the
    same FMR and a higher FNMR), to the first with FNMR = 0 when asked (as scikit-learn's
    det_curve), without the inner points of straight runs."""
    start = int(np.flatnonzero(roc.fmr == 0)[-1])
    stop = int(np.flatnonzero(roc.fnmr == 0)[0]) if stop_at_zero_fnmr else roc.fmr.size - 1
    return _drop_inner_points(roc.fmr[start : stop + 1], roc.fnmr[start : stop + 1])


def roc_figure(rocs: Mapping[str, RocCurve], title: str = "") -> Figure:
    """TPR (1 - FNMR) against FMR on a log axis down to the finest FMR step, one per method."""
    figure = Figure(figsize=(4.8, 3.8), layout="constrained")
    axis = figure.subplots()
    zero = zero_position(rocs, "fmr")
    for method, roc in rocs.items():
        fmr, fnmr = curve_vertices(roc, stop_at_zero_fnmr=False)
        axis.plot(np.maximum(fmr, zero), 1.0 - fnmr, label=method)
    axis.set_xscale("log")
    axis.set_xlim(zero, 1.0)
    axis.set_ylim(0.0, 1.01)
    axis.set_xlabel(f"FMR (false match rate; 0 drawn at {zero:.2g})")
    axis.set_ylabel("TPR = 1 - FNMR")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=10)
    return figure


def det_ticks(zero: float) -> np.ndarray:
    """Probability ticks from the zero position up: every decade to 0.01, then 0.05 ... 0.95."""
    decades = 10.0 ** np.arange(np.ceil(np.log10(zero)), -1.0)  # 10^-m ... 10^-2
    ticks = np.concatenate([decades, DET_TICKS_ABOVE_1E2])
    return ticks[ticks >= zero]


def tick_text(tick: float) -> str:
    """A DET tick label: decades as 1e-4 (short), the rest as 0.05."""
    exponent = math.log10(tick)
    return f"1e{round(exponent)}" if tick < 0.01 and exponent == round(exponent) else f"{tick:g}"


LABEL_GAP_POINTS = 2.0  # at least this much space between two shown tick labels


def hide_overlapping_tick_labels(figure: Figure, axis) -> None:
    """Hide tick labels that would overlap one already kept, keeping from the high end down
    (the named rates 0.95 ... 0.05 first, then the decades), after laying the figure out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # lays out (constrained) so the extents are the drawn ones
    renderer = canvas.get_renderer()
    gap = LABEL_GAP_POINTS * figure.dpi / 72.0
    for ticks in (axis.xaxis, axis.yaxis):
        kept = []
        for label in reversed(ticks.get_ticklabels()):
            if not label.get_visible() or not label.get_text():
                continue
            box = label.get_window_extent(renderer).expanded(1.0, 1.0).padded(gap / 2)
            if any(box.overlaps(other) for other in kept):
                label.set_visible(False)
            else:
                kept.append(box)


def det_figure(
    rocs: Mapping[str, RocCurve], title: str = "", figsize: tuple[float, float] = (4.8, 3.8)
) -> Figure:
    """DET: FNMR against FMR on normal-deviate (probit) axes, one line per method; each axis
    reaches down to the finest step any curve has (1 / pairs), a rate of 0 at zero_position.
    Tick labels that would overlap at this size are left out."""
    from scipy.stats import norm

    zeros = {rate: zero_position(rocs, rate) for rate in ("fmr", "fnmr")}

    def probit(values: np.ndarray, rate: str) -> np.ndarray:
        return norm.ppf(np.clip(values, zeros[rate], 1.0 - zeros[rate]))

    figure = Figure(figsize=figsize, layout="constrained")
    axis = figure.subplots()
    for method, roc in rocs.items():
        fmr, fnmr = curve_vertices(roc, stop_at_zero_fnmr=True)
        marker = "o" if fmr.size == 1 else None  # perfect separation: one point at (0, 0)
        axis.plot(probit(fmr, "fmr"), probit(fnmr, "fnmr"), marker=marker, label=method)
    for rate, set_ticks, set_limits in (
        ("fmr", axis.set_xticks, axis.set_xlim),
        ("fnmr", axis.set_yticks, axis.set_ylim),
    ):
        ticks = det_ticks(zeros[rate])
        set_ticks(probit(ticks, rate), [tick_text(tick) for tick in ticks], fontsize=7)
        set_limits(probit(np.array(zeros[rate]), rate) - 0.1, norm.ppf(DET_TOP))
    axis.set_xlabel(f"FMR (0 drawn at {zeros['fmr']:.2g})")
    axis.set_ylabel(f"FNMR (0 drawn at {zeros['fnmr']:.2g})")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=10)
    hide_overlapping_tick_labels(figure, axis)
    return figure


def vendi_values(diversity: Mapping[str, Mapping]) -> dict[str, list[float]]:
    """{set: per-identity Vendi scores} from vendi_per_identity results."""
    return {
        name: [entry["vendi"] for entry in result["per_identity"].values()]
        for name, result in diversity.items()
    }


def vendi_figure(diversity: Mapping[str, Mapping], title: str = "") -> Figure:
    """Box plot of per-identity Vendi scores, one box per image set."""
    per_set = vendi_values(diversity)
    figure = Figure(figsize=(1.6 * len(per_set) + 2.5, 3.4), layout="constrained")
    axis = figure.subplots()
    axis.boxplot(list(per_set.values()), showmeans=True)
    axis.set_xticks(range(1, len(per_set) + 1), list(per_set), fontsize=8)
    axis.set_ylabel("Vendi score per identity")
    axis.set_title(title, fontsize=10)
    return figure


def quality_figure(scores: Mapping[str, np.ndarray], model: str = "") -> Figure:
    """Density histograms of CR-FIQA scores, one outline per set, shared bins."""
    figure = Figure(figsize=(5.2, 3.4), layout="constrained")
    axis = figure.subplots()
    every = np.concatenate([np.asarray(values, dtype=np.float64) for values in scores.values()])
    low, high = float(every.min()), float(every.max())
    bins = np.linspace(low, high if high > low else low + 1.0, 41)
    for name, values in scores.items():
        if len(values):
            axis.hist(
                values, bins=bins, density=True, histtype="step", label=f"{name} (n={len(values)})"
            )
    axis.set_xlabel("CR-FIQA quality score (higher = better)")
    axis.set_ylabel("density")
    axis.legend(fontsize=7)
    axis.set_title(f"Face image quality ({model})", fontsize=9)
    return figure


MAX_LEGEND_ENTRIES = 12  # more identities than this: colours only, no legend


POSE_AXIS_STEP = 10.0  # degrees: shared pose axes end at a multiple of this, at least +-1 step


def pose_axis_limits(angle_sets: list[np.ndarray]) -> tuple[float, float]:
    """Symmetric (yaw, pitch) half-ranges covering every set's faces, so that all scatters
    share one scale (auto-scaled axes would make a narrow spread look as wide as a broad one)."""
    rows = [np.asarray(a, dtype=np.float64).reshape(-1, 3) for a in angle_sets]
    every = np.concatenate(rows) if rows else np.zeros((0, 3))
    if not len(every):
        return POSE_AXIS_STEP, POSE_AXIS_STEP
    largest = np.abs(every[:, :2]).max(axis=0)  # (2,) yaw, pitch
    steps = np.maximum(np.ceil(largest * 1.05 / POSE_AXIS_STEP), 1.0)
    return float(steps[0] * POSE_AXIS_STEP), float(steps[1] * POSE_AXIS_STEP)


def pose_scatter_figure(
    angles: np.ndarray,
    identities: list[str],
    title: str = "",
    limits: tuple[float, float] | None = None,
) -> Figure:
    """Yaw against pitch (degrees) of every face found, coloured by identity; `limits`: the
    (yaw, pitch) half-ranges shared by all sets (default: this set's own)."""
    figure = Figure(figsize=(4.0, 3.6), layout="constrained")
    axis = figure.subplots()
    angles = np.asarray(angles, dtype=np.float64).reshape(-1, 3)
    labels = np.asarray(identities, dtype=object)
    names = sorted(set(identities))
    for name in names:
        members = angles[labels == name]
        axis.scatter(members[:, 0], members[:, 1], s=12, alpha=0.7, label=name)
    axis.axhline(0.0, color="0.7", linewidth=0.6)
    axis.axvline(0.0, color="0.7", linewidth=0.6)
    yaw_limit, pitch_limit = limits or pose_axis_limits([angles])
    axis.set_xlim(-yaw_limit, yaw_limit)
    axis.set_ylim(-pitch_limit, pitch_limit)
    axis.set_xlabel("yaw (deg, + = turned to image left)")
    axis.set_ylabel("pitch (deg, + = looking up)")
    if 0 < len(names) <= MAX_LEGEND_ENTRIES:
        axis.legend(fontsize=6, markerscale=0.8)
    axis.set_title(f"{title}: {len(angles)} faces, {len(names)} identities", fontsize=9)
    return figure


def training_figure(curves: Mapping[str, Mapping[str, tuple]], title: str = "") -> Figure:
    """A panel per logged loss term (train/<term> against step), a line per identity."""
    from training_logs import CURVE_PREFIX, curve_panels

    panels = curve_panels(curves) or ["loss"]
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(2.6 * columns, 2.0 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, term in zip(axes, panels, strict=False):
        for identity, scalars in curves.items():
            if CURVE_PREFIX + term in scalars:
                steps, values = scalars[CURVE_PREFIX + term]
                axis.plot(steps, values, linewidth=0.9, label=identity)
        axis.set_title(term, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in axes[len(panels) :]:
        axis.set_visible(False)
    if len(curves) <= MAX_LEGEND_ENTRIES:
        axes[0].legend(fontsize=6)
    figure.suptitle(f"{title}: training curves of {len(curves)} identities", fontsize=10)
    return figure


# ------------------------------------------------------------------------------ HTML

STYLE = """
body{font-family:system-ui,Helvetica,Arial,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.2em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}
th:first-child,td:first-child{text-align:left}
th{background:#f0f0f0} img{max-width:100%;margin:0.3em 0}
.note{color:#8a4b00} code,pre{background:#f6f6f6;font-size:12px}
pre{padding:0.6em;overflow-x:auto}
.banner{border:3px solid #b00;background:#fff3cd;color:#600;font-weight:bold;font-size:1.25em;
padding:0.8em 1em;margin:0 0 1em;overflow-wrap:anywhere;white-space:pre-wrap}
.grid td{text-align:left;vertical-align:top}
img.thumb{margin:1px;vertical-align:top;width:96px;height:96px;object-fit:cover}
table.text td{text-align:left} td.best{background:#e6f4ea}
"""


def format_value(value: object) -> str:
    """Numbers to 4 significant digits; everything else as text."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return NOT_AVAILABLE if np.isnan(value) else f"{float(value):.4g}"
    return str(value)


def html_table(header: list[str], rows: list[list[object]]) -> str:
    """An escaped HTML table."""
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(cell))}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def html_image(data: bytes, alt: str, mime: str = "image/png", css_class: str = "") -> str:
    """Inline <img> with base64 data (PNG unless `mime` says otherwise)."""
    encoded = base64.b64encode(data).decode("ascii")
    extra = f' class="{css_class}" title="{html.escape(alt)}"' if css_class else ""
    return f'<img alt="{html.escape(alt)}"{extra} src="data:{mime};base64,{encoded}">'


MEAN_STD_DIGITS = 4  # significant digits of the larger of |mean| and std


def mean_std_text(mean: float, std: float) -> str:
    """'mean ± std' with both printed to the same decimal place: 4 significant digits of the
    larger of the two ('n/a' without a mean, e.g. no face was found)."""
    if mean is None or not math.isfinite(mean):
        return NOT_AVAILABLE
    if std is None or not math.isfinite(std):
        return f"{format_value(mean)} ± {NOT_AVAILABLE}"
    scale = max(abs(mean), abs(std))
    if scale == 0:
        return "0 ± 0"
    decimals = MEAN_STD_DIGITS - 1 - math.floor(math.log10(scale))
    if not 0 <= decimals <= 8:  # very large or very small: one shared exponent format
        return f"{mean:.3e} ± {std:.3e}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _mean_std(entry: Mapping, mean_key: str, std_key: str) -> str:
    """mean_std_text of two keys of an entry."""
    return mean_std_text(entry[mean_key], entry[std_key])


def _threshold_cell(entry: Mapping) -> str:
    """'threshold (FMR / FNMR)' at the EER threshold."""
    fmr, fnmr = format_value(entry["eer_threshold_fmr"]), format_value(entry["eer_threshold_fnmr"])
    return f"{format_value(entry['eer_threshold'])} ({fmr} / {fnmr})"


def _getter(key: str) -> Callable[[Mapping], object]:
    """entry -> entry[key]."""
    return lambda entry: entry[key]


def verification_rows(by_method: Mapping[str, Mapping]) -> tuple[list[str], list[list[object]]]:
    """Metric-per-row table over methods (skipped methods show their reason)."""
    methods = list(by_method)
    measured = {m: e for m, e in by_method.items() if "skipped" not in e}
    rows: list[list[object]] = []
    if measured:
        sample = next(iter(measured.values()))
        spec = [
            ("genuine pairs", lambda e: e["n_genuine"]),
            ("impostor pairs", lambda e: e["n_impostor"]),
            ("genuine mean ± std", lambda e: _mean_std(e, "genuine_mean", "genuine_std")),
            ("impostor mean ± std", lambda e: _mean_std(e, "impostor_mean", "impostor_std")),
            (f"EER {arrow('eer_fvc2000')} (pyeer / FVC2000: the paper's)", _getter("eer_fvc2000")),
            (f"EER {arrow('eer')} (interpolated ROC crossing)", _getter("eer")),
            ("EER threshold (FMR / FNMR there)", _threshold_cell),
            (f"AUC {arrow('auc')}", _getter("auc")),
            (f"FDR {arrow('fdr')}", _getter("fdr")),
            (f"decidability d' {arrow('decidability')}", _getter("decidability")),
        ]
        spec += [
            (f"FNMR @ FMR={t} {arrow('fnmr_at_fmr')}", lambda e, t=t: e["fnmr_at_fmr"][t]["value"])
            for t in sample["fnmr_at_fmr"]
        ]
        spec += [
            (f"FMR @ FNMR={t} {arrow('fmr_at_fnmr')}", lambda e, t=t: e["fmr_at_fnmr"][t]["value"])
            for t in sample["fmr_at_fnmr"]
        ]
        rows = [
            [label] + [getter(measured[m]) if m in measured else "" for m in methods]
            for label, getter in spec
        ]
    reasons = [f"skipped: {by_method[m]['skipped']}" if m not in measured else "" for m in methods]
    if any(reasons):
        rows.append(["note", *reasons])
    return ["metric", *methods], rows


COMPARISON_TITLES = {
    "synthetic_vs_synthetic": "Synthetic vs synthetic (identity consistency and separability)",
    "synthetic_vs_real": "Synthetic vs real (same identity name = genuine)",
    "real_vs_real": "Real vs real (reference)",
}


def sets_section(sets: Mapping[str, Mapping]) -> str:
    """Data set table and collapsible lists of images without a face / unreadable."""
    rows = [
        [
            name,
            s["role"],
            s["root"],
            s["n_identities"],
            s["n_images"],
            s["n_with_face"],
            s["n_no_face"],
            s["n_unreadable"],
        ]
        for name, s in sets.items()
    ]
    parts = [
        "<h2>Image sets</h2>",
        html_table(
            [
                "set",
                "role",
                "folder",
                "identities",
                "images",
                "face found",
                "no face",
                "unreadable",
            ],
            rows,
        ),
    ]
    for name, s in sets.items():
        for key, label in (
            ("no_face", "no face found"),
            ("unreadable", "unreadable"),
            ("empty_identities", "identity folders without images"),
            ("loose_files", "images outside identity folders (not evaluated)"),
            ("excluded", "files excluded by --exclude"),
        ):
            if s.get(key):
                items = "".join(f"<li><code>{html.escape(p)}</code></li>" for p in s[key])
                parts.append(
                    f"<details><summary>{html.escape(name)}: {len(s[key])} "
                    f"{label}</summary><ul>{items}</ul></details>"
                )
    return "\n".join(parts)


def identity_section(identity: Mapping[str, Mapping], figures: Mapping[str, bytes]) -> str:
    """One table + histogram/ROC/DET per comparison."""
    parts = ["<h2>Identity consistency and separability</h2>"]
    for comparison, by_method in identity.items():
        parts.append(f"<h3>{html.escape(COMPARISON_TITLES.get(comparison, comparison))}</h3>")
        parts.append(html_table(*verification_rows(by_method)))
        for kind in ("hist", "roc", "det"):
            key = f"{comparison}_{kind}"
            if key in figures:
                parts.append(html_image(figures[key], key))
    return "\n".join(parts)


def diversity_section(diversity: Mapping, figures: Mapping[str, bytes]) -> str:
    """Vendi table (+ box plot)."""
    parts = ["<h2>Diversity (Vendi score per identity, DINOv2 features)</h2>"]
    if "skipped" in diversity:
        return parts[0] + f'<p class="note">Skipped: {html.escape(diversity["skipped"])}</p>'
    rows = [
        [name, _mean_std(entry, "mean", "std"), entry["n_identities"], entry["n_images"]]
        for name, entry in diversity.items()
    ]
    parts.append(
        html_table(
            ["set", f"Vendi {arrow('vendi')} mean ± std over identities", "identities", "images"],
            rows,
        )
    )
    if "vendi" in figures:
        parts.append(html_image(figures["vendi"], "vendi"))
    notes = {entry["figure_note"] for entry in diversity.values() if "figure_note" in entry}
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in sorted(notes)]
    return "\n".join(parts)


def vendi_identity_table(diversity: Mapping[str, Mapping]) -> str:
    """HTML table: one row per identity, its Vendi score in each set (blank if absent)."""
    names = sorted(
        {identity for result in diversity.values() for identity in result["per_identity"]}
    )
    rows = [
        [identity]
        + [
            result["per_identity"].get(identity, {}).get("vendi", "")
            for result in diversity.values()
        ]
        for identity in names
    ]
    return html_table(["identity", *diversity], rows)


def identity_consistency_table(consistency: Mapping[str, Mapping]) -> str:
    """HTML table of metrics.per_identity_consistency, least consistent identity first."""
    ordered = sorted(consistency.items(), key=lambda item: np.nan_to_num(item[1]["mean"], nan=2.0))
    rows = [[name, e["n_images"], e["n_pairs"], e["mean"], e["min"]] for name, e in ordered]
    return html_table(["identity", "images", "genuine pairs", "mean cosine", "min cosine"], rows)


def _fidelity_cells(entry: Mapping) -> list[object]:
    """FD, KD, PRDC cells of one method; a skipped metric shows its reason."""
    fd, kd, prdc = entry["frechet_distance"], entry["kernel_distance"], entry["prdc"]
    cells: list[object] = []
    cells += [f"skipped: {fd['skipped']}"] if "skipped" in fd else [fd["value"]]
    if "skipped" in kd:
        cells += [f"skipped: {kd['skipped']}", ""]
    else:
        cells += [_mean_std(kd, "mean", "std"), f"{kd['n_subsets']} x {kd['subset_size']}"]
    if "skipped" in prdc:
        cells += [f"skipped: {prdc['skipped']}", "", "", ""]
    else:
        cells += [prdc["precision"], prdc["recall"], prdc["density"], prdc["coverage"]]
    counts = fd if "n_real" in fd else kd
    cells.append(f"{counts.get('n_real', '?')} / {counts.get('n_generated', '?')}")
    cells.append(_prdc_sizes_cell(prdc))
    return cells


def _prdc_sizes_cell(prdc: Mapping) -> str:
    """'k=5, 500 / 500 of 2000 / 500': images PRDC used of each set, of those available."""
    if "k" not in prdc:
        return ""
    cell = f"k={prdc['k']}, {prdc['n_real']} / {prdc['n_generated']}"
    if "n_real_available" in prdc:
        cell += f" of {prdc['n_real_available']} / {prdc['n_generated_available']}"
    return cell


FIDELITY_HEADER = [
    "method",
    f"FD {arrow('frechet_distance')}",
    f"KD {arrow('kernel_distance')} mean ± std",
    "KD subsets x size",
    f"precision {arrow('precision')}",
    f"recall {arrow('recall')}",
    f"density {arrow('density')}",
    f"coverage {arrow('coverage')}",
    "images real / generated",
    "PRDC k, images used real / generated (of available)",
]


def fidelity_section(fidelity: Mapping) -> str:
    """FD / KD / PRDC table with sample counts."""
    parts = ["<h2>Fidelity against real images (dgm-eval protocol, DINOv2 features)</h2>"]
    if "skipped" in fidelity:
        return parts[0] + f'<p class="note">Skipped: {html.escape(fidelity["skipped"])}</p>'
    rows = [[method, *_fidelity_cells(entry)] for method, entry in fidelity.items()]
    parts.append(html_table(FIDELITY_HEADER, rows))
    for method, entry in fidelity.items():
        for metric in ("frechet_distance", "prdc"):
            note = entry[metric].get("note")
            if note:
                parts.append(f'<p class="note">{html.escape(method)}: {html.escape(note)}</p>')
    return "\n".join(parts)


def banner_html(text: str | None) -> str:
    """A boxed warning at the top of the report ('' without text)."""
    return f'<div class="banner">{html.escape(text)}</div>' if text else ""


def _skipped(title: str, section: Mapping) -> str | None:
    """Title + the skip reason when the section was not computed, else None."""
    if "skipped" not in section:
        return None
    return f'{title}<p class="note">{html.escape(section["skipped"])}</p>'


def _thumbnail_cell(set_name: str, files: list[str], thumbnails: Mapping) -> str:
    """Inline JPEG thumbnails of one set's files (a note when there are none)."""
    if not files:
        return '<span class="note">no images</span>'
    return "".join(
        html_image(thumbnails[set_name][file], f"{set_name}/{file}", "image/jpeg", "thumb")
        for file in files
    )


def grids_section(grids: Mapping, thumbnails: Mapping[str, Mapping[str, bytes]]) -> str:
    """Per method, one row per identity: generated samples, then that identity's real photos."""
    real = grids["real_set"]
    parts = [
        "<h2>Samples: generated images beside real photos of the same identity</h2>",
        f"<p>Up to {grids['max_images']} generated and {grids['max_images']} real images per "
        f"identity, the first {grids['max_identities']} identities by name "
        f"({grids['thumbnail_size']} px thumbnails).</p>",
    ]
    for method, grid in grids["methods"].items():
        rows = "".join(
            f"<tr><td>{html.escape(identity)}</td>"
            f"<td>{_thumbnail_cell(method, row['generated'], thumbnails)}</td>"
            f"<td>{_real_cell(real, row['real'], thumbnails)}</td></tr>"
            for identity, row in grid["rows"].items()
        )
        parts.append(
            f'<section class="grid" data-method="{html.escape(method)}">'
            f"<h3>{html.escape(method)} ({len(grid['rows'])} of {grid['n_identities']} "
            f'identities)</h3><table class="grid"><tr><th>identity</th><th>generated</th>'
            f"<th>real</th></tr>{rows}</table></section>"
        )
    return "\n".join(parts)


def _real_cell(real: str | None, files: list[str], thumbnails: Mapping) -> str:
    """Real thumbnails, or why there are none."""
    if real is None:
        return '<span class="note">no --real folder given</span>'
    if not files:
        return '<span class="note">no real photos of this identity</span>'
    return _thumbnail_cell(real, files, thumbnails)


def _counts_cells(entry: Mapping) -> list[object]:
    """Images, no face, unreadable cells of a quality / pose entry."""
    return [entry["n_images"], entry["n_no_face"], entry["n_unreadable"]]


def quality_section(quality: Mapping, figures: Mapping[str, bytes]) -> str:
    """CR-FIQA score table per set (+ histogram)."""
    title = "<h2>Face image quality (CR-FIQA)</h2>"
    skipped = _skipped(title, quality)
    if skipped is not None:
        return skipped
    rows = []
    for name, entry in quality["sets"].items():
        if "skipped" in entry:
            rows.append([name, *_counts_cells(entry), f"skipped: {entry['skipped']}", "", ""])
        else:
            cells = [entry["n"], _mean_std(entry, "mean", "std"), entry["median"]]
            rows.append([name, *_counts_cells(entry), *cells])
    header = ["set", "images", "no face", "unreadable", "scored"]
    header += [f"CR-FIQA {arrow('crfiqa')} mean ± std", "median"]
    setting = quality.get("setting_description", "setting not recorded")
    parts = [
        title,
        f"<p>Setting <b>{html.escape(quality.get('setting', '?'))}</b>: "
        f"{html.escape(setting)}. Model <code>{html.escape(quality['model'])}</code> "
        f"(<code>{html.escape(quality['weights'])}</code>): the predicted relative "
        "classifiability of each detected, aligned face; higher = more useful for "
        "recognition.</p>",
        html_table(header, rows),
    ]
    if quality.get("figure") in figures:
        parts.append(html_image(figures[quality["figure"]], quality["figure"]))
    elif quality.get("figure_note"):
        parts.append(f'<p class="note">{html.escape(quality["figure_note"])}</p>')
    return "\n".join(parts)


ANGLES = ("yaw", "pitch", "roll")


def _angle_cells(entry: Mapping) -> list[object]:
    """Per angle: mean ± std over all faces, then mean ± std over identities of its std."""
    cells: list[object] = [_mean_std(entry["all_faces"][angle], "mean", "std") for angle in ANGLES]
    return cells + [_mean_std(entry[angle], "mean", "std") for angle in ANGLES]


POSE_HEADER = [
    "set",
    "images",
    "no face",
    "unreadable",
    "faces",
    "identities (>= 2 faces)",
    *(f"{angle} mean ± std, all faces" for angle in ANGLES),
    *(f"{angle} std per identity {arrow('pose_std_per_identity')}" for angle in ANGLES),
]


def _pose_estimator_text(pose: Mapping) -> str:
    """Which estimator, and whether its numbers compare with the paper's."""
    name = f"<code>{html.escape(pose['estimator'])}</code>"
    if pose.get("comparable_with_paper"):
        return (
            f"Estimator {name}: 6DRepNet on each aligned face padded by 30 px, the paper's "
            "estimator and crop."
        )
    return (
        f"Estimator {name}: dlib landmarks + PnP on a generic 3D face, the offline fallback: "
        '<b class="note">not comparable with the paper</b> (pitch reads compressed, '
        "near-profile faces are missed); pass --pose_weights for 6DRepNet."
    )


def pose_section(pose: Mapping, figures: Mapping[str, bytes]) -> str:
    """The paper's head-pose table (degrees) and a yaw-vs-pitch scatter per set."""
    title = "<h2>Head pose (yaw / pitch / roll, degrees)</h2>"
    skipped = _skipped(title, pose)
    if skipped is not None:
        return skipped
    rows = [
        [name, *_counts_cells(e), e["n_faces"], e["n_identities"], *_angle_cells(e)]
        for name, e in pose["sets"].items()
    ]
    parts = [
        title,
        f"<p>{_pose_estimator_text(pose)} Signs as 6DRepNet's: yaw &gt; 0 = turned towards the "
        "image's left, pitch &gt; 0 = looking up, roll &gt; 0 = clockwise. As the paper: mean ± "
        "std of each angle over all faces; per identity the population std of each angle, "
        "shown as mean ± std over identities (higher = more varied poses).</p>",
        html_table(POSE_HEADER, rows),
    ]
    for name, entry in pose["sets"].items():
        if entry.get("figure") in figures:
            parts.append(html_image(figures[entry["figure"]], entry["figure"]))
        elif entry.get("figure_note"):
            parts.append(
                f'<p class="note">{html.escape(name)}: {html.escape(entry["figure_note"])}</p>'
            )
    return "\n".join(parts)


def pose_identity_table(pose: Mapping) -> str:
    """HTML table: one row per identity, its yaw / pitch / roll std (degrees) in each set."""
    sets = pose["sets"]
    names = sorted({identity for entry in sets.values() for identity in entry["per_identity"]})
    header = ["identity"] + [f"{name}: {angle} std" for name in sets for angle in ANGLES]
    rows = [
        [identity]
        + [
            sets[name]["per_identity"].get(identity, {}).get(angle, "")
            for name in sets
            for angle in ANGLES
        ]
        for identity in names
    ]
    return html_table(header, rows)


def _first_last(summary: Mapping | None) -> str:
    """'first → last (step n)' of a curve summary ('' when the term was not logged)."""
    if not summary:
        return ""
    first, last = format_value(summary["first"]), format_value(summary["last"])
    return f"{first} → {last} (step {summary['last_step']})"


def _training_table(method: Mapping) -> str:
    """Collapsible table: per identity, first -> last value of each logged train/ term."""
    from training_logs import CURVE_PREFIX, curve_panels

    terms = curve_panels({name: e["tags"] for name, e in method["identities"].items()})
    rows = [
        [identity] + [_first_last(entry["tags"].get(CURVE_PREFIX + term)) for term in terms]
        for identity, entry in method["identities"].items()
    ]
    table = html_table(["identity", *terms], rows)
    return f"<details><summary>first → last logged value per identity</summary>{table}</details>"


def training_section(training: Mapping, figures: Mapping[str, bytes]) -> str:
    """Per method: loss curves from its TensorBoard logs, or where they were looked for."""
    title = "<h2>Training curves (TensorBoard logs of train_ID-Booth.py)</h2>"
    skipped = _skipped(title, training)
    if skipped is not None:
        return skipped
    parts = [title]
    for name, method in training["methods"].items():
        parts.append(f"<h3>{html.escape(name)}</h3>")
        for entry in method.get("missing", []):
            parts.append(
                f'<p class="note">{html.escape(entry["identity"])}: no TensorBoard scalars in '
                f"<code>{html.escape(entry['looked_at'])}</code></p>"
            )
        if "skipped" in method:
            parts.append(
                f'<p class="note">No training curves: {html.escape(method["skipped"])}</p>'
            )
            continue
        if method.get("figure") in figures:
            parts.append(html_image(figures[method["figure"]], method["figure"]))
        parts.append(_training_table(method))
    return "\n".join(parts)


def fr_utility_section(fr_utility: Mapping) -> str:
    """The paper's last table: verification accuracy (%) of an FR model per training data."""
    from fr_utility import table_rows

    title = "<h2>Face-recognition utility (verification accuracy, %)</h2>"
    skipped = _skipped(title, fr_utility)
    if skipped is not None:
        return skipped
    header, rows = table_rows(fr_utility)
    rows = [  # two decimals, as the paper prints accuracy; failed settings padded
        [f"{cell:.2f}" if isinstance(cell, float) else cell for cell in row]
        + [""] * (len(header) - len(row))
        for row in rows
    ]
    selection = ", ".join(fr_utility["selection_benchmarks"])
    flags = " ".join(fr_utility["train_flags"])
    return "\n".join(
        [
            title,
            "<p>An IResNet trained on each data setting (Evaluation/train_fr.py), then 10-fold "
            "verification accuracy (insightface's protocol, higher is better) on each benchmark "
            f"and the mean over them. Checkpoint selected, lr plateau and early stop on "
            f"<code>{html.escape(selection)}</code>; train_fr.py flags (a later one overrides "
            f"an earlier one): <code>{html.escape(flags)}</code>.</p>",
            html_table(header, rows),
        ]
    )


def _number(value: object) -> float | None:
    """A finite float, or None (absent, skipped, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _dig(tree: object, *keys: str) -> float | None:
    """tree[k0][k1]... as a finite number, None where any level is missing or skipped."""
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return _number(tree)


def _within_set(results: Mapping, name: str, key: str) -> float | None:
    """A verification number of a set against itself (real: real vs real)."""
    comparison = "real_vs_real" if name == "real" else "synthetic_vs_synthetic"
    return _dig(results.get("identity", {}), comparison, name, key)


# The paper's columns: (header, METRIC_DIRECTIONS key, value of one set in the results)
SUMMARY_COLUMNS: list[tuple[str, str, Callable[[Mapping, str], float | None]]] = [
    ("EER within set (pyeer)", "eer_fvc2000", lambda r, n: _within_set(r, n, "eer_fvc2000")),
    ("FDR within set", "fdr", lambda r, n: _within_set(r, n, "fdr")),
    (
        "EER vs real (pyeer)",
        "eer_fvc2000",
        lambda r, n: _dig(r.get("identity", {}), "synthetic_vs_real", n, "eer_fvc2000"),
    ),
    ("Vendi", "vendi", lambda r, n: _dig(r, "diversity", n, "mean")),
    *(
        (
            f"{angle} std per identity",
            "pose_std_per_identity",
            lambda r, n, a=angle: _dig(r, "pose", "sets", n, a, "mean"),
        )
        for angle in ANGLES
    ),
    ("FD", "frechet_distance", lambda r, n: _dig(r, "fidelity", n, "frechet_distance", "value")),
    ("KD", "kernel_distance", lambda r, n: _dig(r, "fidelity", n, "kernel_distance", "mean")),
    *(
        (metric, metric, lambda r, n, m=metric: _dig(r, "fidelity", n, "prdc", m))
        for metric in ("precision", "recall", "density", "coverage")
    ),
    ("CR-FIQA", "crfiqa", lambda r, n: _dig(r, "quality", "sets", n, "mean")),
]


def summary_table(results: Mapping) -> tuple[list[str], list[list[float | None]], list[set[int]]]:
    """(headers with arrows, one row of values per set, per column the rows holding its best
    generated value). Columns no set has are left out; the real set is a reference, not ranked.
    """
    names = list(results["sets"])
    columns = []
    for header, metric, value_of in SUMMARY_COLUMNS:
        values = [value_of(results, name) for name in names]
        if any(value is not None for value in values):
            columns.append((f"{header} {arrow(metric)}", METRIC_DIRECTIONS[metric], values))
    best_rows = []
    for _, direction, values in columns:
        ranked = {i: v for i, v in enumerate(values) if v is not None and names[i] != "real"}
        pick = max if direction == "higher" else min
        best = format_value(pick(ranked.values())) if ranked else None
        # Ties as printed: sets whose shown values are equal are equally best.
        best_rows.append({i for i, v in ranked.items() if format_value(v) == best})
    rows = [[column[2][i] for column in columns] for i in range(len(names))]
    return [header for header, _, _ in columns], rows, best_rows


def settings_note(results: Mapping) -> str:
    """' Not the paper's settings: ...' for columns measured otherwise than the paper, or ''."""
    notes = []
    pose = results.get("pose", {})
    if isinstance(pose, Mapping) and "sets" in pose and not pose.get("comparable_with_paper"):
        notes.append("pose from the dlib-PnP fallback, not comparable with the paper (give "
                     "--pose_weights for 6DRepNet)")  # fmt: skip
    quality = results.get("quality", {})
    if isinstance(quality, Mapping) and quality.get("setting") not in (None, "paper"):
        notes.append(f"CR-FIQA in setting {quality['setting']}, not the paper's")
    return f" Not the paper's settings: {'; '.join(notes)}." if notes else ""


def summary_section(results: Mapping) -> str:
    """First table: one row per set, the paper's columns with arrows, best generated in bold."""
    headers, rows, best_rows = summary_table(results)
    title = "<h2>Summary (the paper's columns)</h2>"
    if not headers:
        return f'{title}<p class="note">No metric could be computed (see the sections below).</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["set", *headers])
    body = []
    for index, (name, row) in enumerate(zip(results["sets"], rows, strict=True)):
        cells = [f"<td>{html.escape(name)}</td>"]
        for column, value in enumerate(row):
            text = html.escape(format_value(value) if value is not None else "")
            best = index in best_rows[column]
            cells.append(f'<td class="best"><b>{text}</b></td>' if best else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"{title}<p>↑ higher is better, ↓ lower is better; <b>bold</b>: the best generated set "
        "per column as shown (the real set is the reference, not ranked). EER: pyeer's "
        "(FVC2000), as the paper reports; pose: mean per-identity std in degrees."
        f"{html.escape(settings_note(results))}</p>"
        f'<table class="summary"><tr>{head}</tr>{"".join(body)}</table>'
    )


def render_report(
    results: Mapping,
    figures: Mapping[str, bytes],
    thumbnails: Mapping[str, Mapping[str, bytes]] | None = None,
) -> str:
    """The whole report as one HTML string (figures and thumbnails inline)."""
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in results.get("notes", []))
    definitions = html_table(
        ["quantity", "definition"], [[k, v] for k, v in results["definitions"].items()]
    ).replace("<table>", '<table class="text">', 1)
    absent = {"skipped": "not computed"}
    body = [
        banner_html(results.get("banner")),
        "<h1>ID-Booth evaluation report</h1>",
        f"<p>Identity embedder: <code>{html.escape(results['embedder'])}</code>; "
        f"feature model: <code>{html.escape(str(results.get('feature_model')))}</code></p>",
        f'<ul class="note">{notes}</ul>' if notes else "",
        summary_section(results) if "sets" in results else "",
        grids_section(results["grids"], thumbnails or {}) if "grids" in results else "",
        sets_section(results["sets"]),
        identity_section(results["identity"], figures),
        diversity_section(results["diversity"], figures),
        fidelity_section(results["fidelity"]),
        quality_section(results.get("quality", absent), figures),
        pose_section(results.get("pose", absent), figures),
        training_section(results.get("training", absent), figures),
        fr_utility_section(results.get("fr_utility", absent)),
        "<h2>Definitions</h2>",
        definitions,
        "<h2>Configuration</h2>",
        f"<pre>{html.escape(json.dumps(results['config'], indent=2, default=str))}</pre>",
    ]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ID-Booth evaluation</title>"
        f"<style>{STYLE}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )
