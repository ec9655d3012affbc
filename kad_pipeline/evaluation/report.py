"""The evaluation report: a Markdown page and a self-contained HTML page with embedded figures.

Both pages contain the per-query metric table with confidence intervals, ROC curves and a
forest plot of AUC intervals. They also show the pointing-game table with grounding examples
(attention over the image with the ground-truth boxes), the model configuration and lineage,
and the published KAD figures where the dataset matches. The HTML embeds every figure as a base64 PNG, so the
one file can be mailed or archived. The Markdown links the same PNGs under ``figures/``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

logger = logging.getLogger(__name__)

# Zero-shot results of KAD with a ResNet-50 image encoder at 224 px, transcribed from the
# KAD paper (Zhang et al., "Knowledge-enhanced visual-language pre-training on chest
# radiology images", Nature Communications 2023). Macro means over each dataset's queries;
# PadChest is per query (AUC only).
PUBLISHED_KAD_ZERO_SHOT: dict[str, dict] = {
    "chestxray14": {"label": "ChestX-ray14 test, 14 findings",
                    "macro": {"auc": 0.789, "mcc": 0.280, "f1": 0.323, "acc": 0.816}},
    "chexpert": {"label": "CheXpert test, 5 competition findings",
                 "macro": {"auc": 0.905, "mcc": 0.589, "f1": 0.647, "acc": 0.875}},
    "padchest": {"label": "PadChest, per-finding AUC",
                 "auc": {"atelectasis": 0.809, "cardiomegaly": 0.916, "consolidation": 0.910,
                         "edema": 0.966, "pneumonia": 0.835}},
}
PUBLISHED_SOURCE = "Zhang et al., Nature Communications 2023 (KAD, ResNet-50, 224 px, zero-shot)"

# Colours used in the figures; tests look for them in rendered pages.
OUR_COLOUR = "#1f5fbf"
PUBLISHED_COLOUR = "#e08000"
BOX_COLOUR = "#00e000"

MAX_ROC_CURVES = 15  # more curves than this are unreadable on one plot; the most frequent findings are drawn
MAX_FOREST_ROWS = 60


@dataclass
class GroundingExample:
    """One image with the attention map of one finding, its boxes and the pointing-game peak."""

    image_id: str
    finding: str
    pixels: np.ndarray  # (H, W) floats in [0, 1]
    attention: np.ndarray  # (h, w)
    boxes: np.ndarray  # (k, 4) x0, y0, x1, y1 in pixels of ``pixels``
    point: tuple[float, float]  # (x, y) of the attention maximum
    hit: bool


@dataclass
class ReportInputs:
    """Everything the report shows."""

    title: str
    metrics: pl.DataFrame  # the table of ``metrics.evaluate_tables``
    labels: np.ndarray  # (n_images, n_queries) test labels, NaN missing; for ROC curves
    scores: np.ndarray  # (n_images, n_queries) test scores
    queries: list[str]
    model_config: dict
    lineage: dict
    dataset_key: str | None = None  # a key of PUBLISHED_KAD_ZERO_SHOT, or None when no published figure applies
    bootstrap: dict = field(default_factory=dict)  # n_resamples, alpha, seed
    grounding_summary: pl.DataFrame | None = None
    grounding_examples: list[GroundingExample] = field(default_factory=list)


@dataclass
class Report:
    """The rendered report: Markdown text, HTML text and the PNG figures by file name."""

    markdown: str
    html: str
    figures: dict[str, bytes]


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (false positive rate, true positive rate) at every distinct score, from (0, 0) to (1, 1)."""
    known = ~np.isnan(labels)
    y = labels[known]
    s = scores[known]
    order = np.argsort(-s, kind="stable")
    y = y[order]
    s = s[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(1 - y)[last_of_tie]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def plot_roc_curves(inputs: ReportInputs) -> bytes:
    """Draw the ROC curve of each query with both classes present (at most MAX_ROC_CURVES)."""
    aucs = {row["query"]: row["auc"] for row in inputs.metrics.iter_rows(named=True)}
    positives = np.nansum(inputs.labels, axis=0)
    drawable = [q for q in range(len(inputs.queries)) if np.isfinite(aucs.get(inputs.queries[q], np.nan))]
    drawable.sort(key=lambda q: -positives[q])
    figure, axes = plt.subplots(figsize=(6.5, 6))
    for q in drawable[:MAX_ROC_CURVES]:
        fpr, tpr = roc_points(inputs.labels[:, q], inputs.scores[:, q])
        axes.plot(fpr, tpr, linewidth=1.4, label=f"{inputs.queries[q]} ({aucs[inputs.queries[q]]:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="False positive rate", ylabel="True positive rate", xlim=(0, 1), ylim=(0, 1.01),
             title="ROC curves (AUC in brackets)")
    if drawable:
        axes.legend(loc="lower right", fontsize=8)
    if len(drawable) > MAX_ROC_CURVES:
        axes.text(0.02, 0.97, f"{MAX_ROC_CURVES} of {len(drawable)} queries, most positives first",
                  transform=axes.transAxes, fontsize=8, va="top")
    figure.tight_layout()
    return _png(figure)


def plot_auc_forest(inputs: ReportInputs) -> bytes:
    """Draw per-query AUC with its interval, the macro row, and published AUCs where known."""
    rows = [row for row in inputs.metrics.iter_rows(named=True)]
    query_rows = [row for row in rows if row["query"] != "macro"][:MAX_FOREST_ROWS]
    macro_rows = [row for row in rows if row["query"] == "macro"]
    shown = query_rows + macro_rows
    published = PUBLISHED_KAD_ZERO_SHOT.get(inputs.dataset_key or "", {})
    published_auc = dict(published.get("auc", {}))
    if "macro" in published:
        published_auc["macro"] = published["macro"]["auc"]

    figure, axes = plt.subplots(figsize=(7, 1.4 + 0.3 * len(shown)))
    positions = np.arange(len(shown))[::-1]
    has_published = False
    lowest = 0.5
    for y, row in zip(positions, shown):
        if np.isfinite(row["auc"]):
            if np.isfinite(row["auc_low"]):
                axes.plot([row["auc_low"], row["auc_high"]], [y, y], color=OUR_COLOUR, linewidth=2)
                lowest = min(lowest, row["auc_low"])
            axes.plot(row["auc"], y, "s", color=OUR_COLOUR, markersize=6)
            lowest = min(lowest, row["auc"])
        if row["query"] in published_auc:
            axes.plot(published_auc[row["query"]], y, "D", color=PUBLISHED_COLOUR, markersize=7)
            has_published = True
    axes.set_yticks(positions, [row["query"] for row in shown])
    for label, row in zip(axes.get_yticklabels(), shown):
        if row["query"] == "macro":
            label.set_fontweight("bold")
    axes.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    axes.set_ylim(-0.7, len(shown) - 0.3)
    axes.set_xlim(max(0.0, lowest - 0.05), 1.02)
    axes.set_xlabel(f"AUC with {100 * (1 - inputs.bootstrap.get('alpha', 0.05)):.0f}% bootstrap interval")
    handles = [plt.Line2D([], [], color=OUR_COLOUR, marker="s", label="this evaluation")]
    if has_published:
        handles.append(plt.Line2D([], [], color=PUBLISHED_COLOUR, marker="D", linestyle="", label="published KAD"))
    axes.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8, frameon=False)
    figure.tight_layout()
    return _png(figure)


def plot_grounding_example(example: GroundingExample) -> bytes:
    """Draw the image, its upsampled attention map, the ground-truth boxes and the peak."""
    height, width = example.pixels.shape
    attention = torch.from_numpy(np.asarray(example.attention, dtype=np.float32))[None, None]
    upsampled = F.interpolate(attention, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
    figure, axes = plt.subplots(figsize=(4, 4.3))
    axes.imshow(example.pixels, cmap="gray", vmin=0, vmax=1)
    axes.imshow(upsampled, cmap="jet", alpha=0.35)
    for x0, y0, x1, y1 in np.asarray(example.boxes).reshape(-1, 4):
        axes.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=BOX_COLOUR, linewidth=2))
    axes.plot(*example.point, marker="x" if not example.hit else "o", color="white", markersize=10,
              markeredgewidth=2, fillstyle="none")
    axes.set_title(f"{example.finding}: {'hit' if example.hit else 'miss'}\n{example.image_id}", fontsize=9)
    axes.axis("off")
    figure.tight_layout()
    return _png(figure)


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------

def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _with_interval(row: dict, name: str) -> str:
    text = _number(row[name])
    if row[name] is not None and np.isfinite(row[name]) and np.isfinite(row[f"{name}_low"]):
        text += f" [{_number(row[f'{name}_low'])}, {_number(row[f'{name}_high'])}]"
    return text


METRIC_HEADER = ["query", "n", "positives", "AUC", "threshold", "MCC", "F1", "accuracy"]


def metric_table_rows(metrics: pl.DataFrame) -> list[list[str]]:
    """Format the metric table as text cells: value [low, high] for each metric."""
    cells = []
    for row in metrics.iter_rows(named=True):
        cells.append([row["query"], str(row["n"]), str(row["positives"]), _with_interval(row, "auc"),
                      _number(row["threshold"]), _with_interval(row, "mcc"), _with_interval(row, "f1"),
                      _with_interval(row, "acc")])
    return cells


def published_rows(dataset_key: str | None, metrics: pl.DataFrame) -> list[list[str]]:
    """Rows of (what, metric, published, ours) for the published figures that match this dataset."""
    published = PUBLISHED_KAD_ZERO_SHOT.get(dataset_key or "")
    if not published:
        return []
    ours = {row["query"]: row for row in metrics.iter_rows(named=True)}
    rows = []
    for name, value in published.get("macro", {}).items():
        rows.append(["macro", name.upper() if name != "acc" else "accuracy", _number(value),
                     _number(ours.get("macro", {}).get(name))])
    for query, value in published.get("auc", {}).items():
        rows.append([query, "AUC", _number(value), _number(ours[query]["auc"]) if query in ours else "not evaluated"])
    return rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]], css_class: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _grounding_rows(summary: pl.DataFrame | None) -> list[list[str]]:
    if summary is None:
        return []
    return [[row["finding"], str(row["pairs"]), str(row["hits"]), _number(row["hit_rate"])]
            for row in summary.iter_rows(named=True)]


def _threshold_note(metrics: pl.DataFrame) -> str:
    sources = sorted(set(metrics.get_column("threshold_source").to_list()))
    if sources == ["fixed"]:
        return "Thresholds: one fixed threshold for every query."
    note = f"Thresholds: MCC-optimal, chosen on the {', '.join(sources)} split."
    if any("optimistic" in s for s in sources):
        note += (" WARNING: thresholds were chosen on the test set itself, as the KAD reference code does; "
                 "MCC, F1 and accuracy are optimistic.")
    return note


def build_report(inputs: ReportInputs) -> Report:
    """Render the report as Markdown, self-contained HTML and PNG figures."""
    figures = {"roc_curves.png": plot_roc_curves(inputs), "auc_forest.png": plot_auc_forest(inputs)}
    example_names = []
    for index, example in enumerate(inputs.grounding_examples):
        name = f"grounding_{index:02d}.png"
        figures[name] = plot_grounding_example(example)
        example_names.append(name)

    table_rows = metric_table_rows(inputs.metrics)
    comparison = published_rows(inputs.dataset_key, inputs.metrics)
    grounding = _grounding_rows(inputs.grounding_summary)
    bootstrap = inputs.bootstrap
    interval_text = (f"Intervals: {100 * (1 - bootstrap.get('alpha', 0.05)):.0f}% percentile bootstrap over "
                     f"{bootstrap.get('n_resamples', 'n/a')} paired resamples of the test images "
                     f"(seed {bootstrap.get('seed', 'n/a')}).")
    threshold_text = _threshold_note(inputs.metrics)
    config_text = json.dumps(inputs.model_config, indent=2, sort_keys=True, default=str)
    lineage_text = json.dumps(inputs.lineage, indent=2, sort_keys=True, default=str)
    queries_total = inputs.metrics.height - 1

    markdown = [f"# {inputs.title}", "",
                f"{queries_total} queries. {interval_text} {threshold_text}", "",
                "## Metrics per query", "", _markdown_table(METRIC_HEADER, table_rows), "",
                "![ROC curves](figures/roc_curves.png)", "", "![AUC forest plot](figures/auc_forest.png)", ""]
    if comparison:
        markdown += ["## Published KAD figures", "",
                     f"Context only: {PUBLISHED_SOURCE}; "
                     f"{PUBLISHED_KAD_ZERO_SHOT[inputs.dataset_key]['label']}. Different data or splits make "
                     "these numbers not directly comparable.", "",
                     _markdown_table(["query", "metric", "published", "ours"], comparison), ""]
    if grounding:
        markdown += ["## Grounding (pointing game)", "",
                     _markdown_table(["finding", "pairs", "hits", "hit rate"], grounding), ""]
        markdown += [f"![grounding example {i + 1}](figures/{name})" for i, name in enumerate(example_names)]
        markdown += [""]
    markdown += ["## Model configuration", "", "```json", config_text, "```", "",
                 "## Lineage", "", "```json", lineage_text, "```", ""]

    def image(name: str, alt: str) -> str:
        encoded = base64.b64encode(figures[name]).decode("ascii")
        return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'

    body = [f"<h1>{html.escape(inputs.title)}</h1>",
            f"<p>{queries_total} queries. {html.escape(interval_text)} {html.escape(threshold_text)}</p>",
            "<h2>Metrics per query</h2>", _html_table(METRIC_HEADER, table_rows, "metrics"),
            '<div class="figures">', image("roc_curves.png", "ROC curves"),
            image("auc_forest.png", "AUC forest plot"), "</div>"]
    if comparison:
        body += ["<h2>Published KAD figures</h2>",
                 f"<p>Context only: {html.escape(PUBLISHED_SOURCE)}; "
                 f"{html.escape(PUBLISHED_KAD_ZERO_SHOT[inputs.dataset_key]['label'])}. Different data or splits "
                 "make these numbers not directly comparable.</p>",
                 _html_table(["query", "metric", "published", "ours"], comparison, "published")]
    if grounding:
        body += ["<h2>Grounding (pointing game)</h2>",
                 _html_table(["finding", "pairs", "hits", "hit rate"], grounding, "grounding"),
                 '<div class="figures">'] + [image(n, f"grounding example {i + 1}") for i, n in enumerate(example_names)]
        body += ["</div>"]
    body += ["<h2>Model configuration</h2>", f"<pre>{html.escape(config_text)}</pre>",
             "<h2>Lineage</h2>", f"<pre>{html.escape(lineage_text)}</pre>"]
    style = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
             "th,td{border:1px solid #bbb;padding:3px 8px;font-size:13px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}.metrics tr:last-child td,.grounding tr:last-child td{font-weight:bold}"
             ".figures img{max-width:48%;margin:4px;vertical-align:top}pre{background:#f4f4f4;padding:8px}")
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(inputs.title)}</title><style>{style}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    logger.info("rendered report %r: %d queries, %d figures", inputs.title, queries_total, len(figures))
    return Report("\n".join(markdown), page, figures)
