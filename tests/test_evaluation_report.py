"""Scoring feeds grounding and the report; the report renders what it should."""

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from kad_pipeline.evaluation.grounding import pointing_game
from kad_pipeline.evaluation.metrics import BootstrapSettings, evaluate_arrays
from kad_pipeline.evaluation.report import (
    BOX_COLOUR, OUR_COLOUR, PUBLISHED_COLOUR, GroundingExample, ReportInputs, build_report,
)
from kad_pipeline.evaluation.scoring import load_grayscale, score_images

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ---------------------------------------------------------------------------
# Scoring with a tiny model that has the KAD ``score`` signature
# ---------------------------------------------------------------------------

class MeanBrightnessModel(torch.nn.Module):
    """Probability = sigmoid(mean pixel * weight of the query); attention = 2x2 pooled image."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def score(self, images, query_embeddings):
        self.batch_sizes.append(images.shape[0])
        brightness = images.mean(dim=(1, 2, 3))  # (B,)
        probs = torch.sigmoid(brightness[:, None] * query_embeddings[:, 0][None, :])  # (B, Q)
        pooled = torch.nn.functional.adaptive_avg_pool2d(images[:, :1], 2)  # (B, 1, 2, 2)
        attention = pooled.expand(-1, query_embeddings.shape[0], -1, -1)  # (B, Q, 2, 2)
        return probs, attention


def _write_images(folder, count):
    paths = []
    for i in range(count):
        pixels = np.full((20, 30), 10 * i, dtype=np.uint8)
        pixels[10:, 15:] = 255  # bright bottom-right quarter: the attention peak
        path = folder / f"img{i}.png"
        Image.fromarray(pixels, mode="L").save(path)
        paths.append(path)
    return paths


def test_scoring_keeps_short_last_batch(tmp_path):
    paths = _write_images(tmp_path, 7)
    model = MeanBrightnessModel()
    embeddings = torch.tensor([[1.0], [-2.0]])
    result = score_images(model, paths, [f"id{i}" for i in range(7)], embeddings, ["edema", "mass"],
                          image_size=8, normalize=lambda x: x, batch_size=3, keep_attention=True)

    assert model.batch_sizes == [3, 3, 1]
    assert result.scores.height == 14
    assert result.scores.columns == ["image_id", "query", "probability"]
    expected_brightness = (0.75 * 60 + 0.25 * 255) / 255
    row = result.scores.filter((pl.col("image_id") == "id6") & (pl.col("query") == "mass")).row(0)
    assert row[2] == pytest.approx(1 / (1 + np.exp(2.0 * expected_brightness)), abs=1e-3)
    assert result.attention.shape == (7, 2, 2, 2)
    assert result.image_sizes.row(0, named=True) == {"image_id": "id0", "height": 20, "width": 30}


def test_scoring_attention_feeds_pointing_game(tmp_path):
    paths = _write_images(tmp_path, 2)
    result = score_images(MeanBrightnessModel(), paths, ["a", "b"], torch.ones(1, 1), ["mass"],
                          image_size=8, normalize=lambda x: x, keep_attention=True)
    boxes = pl.DataFrame({"image_id": ["a", "b"], "finding": ["mass", "mass"],
                          "x0": [15.0, 0.0], "y0": [10.0, 0.0], "x1": [30.0, 15.0], "y1": [20.0, 10.0]})
    sizes = {r["image_id"]: (r["height"], r["width"]) for r in result.image_sizes.iter_rows(named=True)}
    points, summary = pointing_game(result.attention_by_pair(), boxes, sizes)
    assert points.get_column("hit").to_list() == [True, False]
    assert summary.filter(pl.col("finding") == "overall").row(0, named=True)["hit_rate"] == 0.5


def test_scoring_wrong_shape_raises(tmp_path):
    paths = _write_images(tmp_path, 2)

    class Broken(MeanBrightnessModel):
        def score(self, images, query_embeddings):
            probs, attention = super().score(images, query_embeddings)
            return probs[:, :1], attention

    with pytest.raises(ValueError, match="probabilities of shape"):
        score_images(Broken(), paths, ["a", "b"], torch.ones(2, 1), ["q1", "q2"], image_size=8,
                     normalize=lambda x: x)


def test_scoring_nan_probability_raises(tmp_path):
    paths = _write_images(tmp_path, 2)

    class NaNModel(MeanBrightnessModel):
        def score(self, images, query_embeddings):
            probs, attention = super().score(images, query_embeddings)
            return probs * float("nan"), attention

    with pytest.raises(ValueError, match="NaN"):
        score_images(NaNModel(), paths, ["a", "b"], torch.ones(1, 1), ["q"], image_size=8, normalize=lambda x: x)


def test_sixteen_bit_png_is_min_max_scaled(tmp_path):
    pixels = np.array([[100, 4095], [2097, 100]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    loaded = load_grayscale(path)
    assert loaded.dtype == np.float32
    assert loaded.min() == 0.0
    assert loaded.max() == 1.0
    assert loaded[1, 0] == pytest.approx(0.5, abs=1e-3)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

QUERIES = ["atelectasis", "cardiomegaly", "edema"]


def _report_inputs(dataset_key="padchest", examples=2):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (150, 3)).astype(float)
    scores = np.clip(0.35 * labels + 0.65 * rng.random((150, 3)), 0, 1)
    metrics = evaluate_arrays(QUERIES, scores, labels, np.array([0.5, 0.5, 0.5]),
                              bootstrap=BootstrapSettings(n_resamples=100))
    pixels = np.tile(np.linspace(0.2, 0.8, 64, dtype=np.float32), (64, 1))
    attention = np.zeros((4, 4), dtype=np.float32)
    attention[2, 1] = 1.0
    grounding_examples = [
        GroundingExample(f"img{i}", "cardiomegaly", pixels, attention, np.array([[10.0, 30.0, 40.0, 60.0]]),
                         (24.0, 40.0), True)
        for i in range(examples)
    ]
    summary = pl.DataFrame({"finding": ["cardiomegaly", "overall"], "pairs": [4, 4], "hits": [3, 3],
                            "hit_rate": [0.75, 0.75]})
    return ReportInputs(
        title="Zero-shot evaluation: test",
        metrics=metrics, labels=labels, scores=scores, queries=QUERIES,
        model_config={"backbone": "resnet50", "image_size": 224},
        lineage={"checkpoint_uri": "/artifacts/kad_model/abc", "run_id": "run-123"},
        dataset_key=dataset_key, bootstrap={"n_resamples": 100, "alpha": 0.05, "seed": 0},
        grounding_summary=summary, grounding_examples=grounding_examples,
    )


def _embedded_pngs(page):
    return [Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
            for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _has_colour(image, colour, tolerance=40, minimum=20):
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    distance = np.abs(np.asarray(image, dtype=int) - target).sum(axis=2)
    return int((distance <= tolerance).sum()) >= minimum


def test_report_html_contains_table_and_images():
    inputs = _report_inputs()
    report = build_report(inputs)
    page = report.html

    for row in inputs.metrics.iter_rows(named=True):
        assert f"<td>{row['query']}</td>" in page
        assert f"{row['auc']:.3f} [{row['auc_low']:.3f}, {row['auc_high']:.3f}]" in page
    assert "0.916" in page  # published PadChest cardiomegaly AUC
    assert "0.750" in page  # pointing-game hit rate
    assert "run-123" in page
    assert "resnet50" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing is fetched from elsewhere

    images = _embedded_pngs(page)
    assert len(images) == 2 + 2  # ROC curves, forest plot, two grounding examples
    assert set(report.figures) == {"roc_curves.png", "auc_forest.png", "grounding_00.png", "grounding_01.png"}
    assert _has_colour(images[1], OUR_COLOUR)
    assert _has_colour(images[1], PUBLISHED_COLOUR)
    assert _has_colour(images[2], BOX_COLOUR)


def test_report_markdown_links_figures():
    report = build_report(_report_inputs())
    for name in ("roc_curves.png", "auc_forest.png", "grounding_00.png"):
        assert f"(figures/{name})" in report.markdown
    assert "| macro |" in report.markdown
    assert "## Published KAD figures" in report.markdown


def test_report_without_published_match():
    report = build_report(_report_inputs(dataset_key=None, examples=0))
    assert "Published KAD figures" not in report.html
    images = _embedded_pngs(report.html)
    assert len(images) == 2
    assert not _has_colour(images[1], PUBLISHED_COLOUR)


def test_report_labels_optimistic_thresholds():
    inputs = _report_inputs()
    inputs.metrics = inputs.metrics.with_columns(pl.lit("test (optimistic)").alias("threshold_source"))
    report = build_report(inputs)
    assert "optimistic" in report.html
    assert "WARNING" in report.markdown


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    report = build_report(_report_inputs())
    page = tmp_path / "report.html"
    page.write_text(report.html, encoding="utf-8")
    screenshot = tmp_path / "report.png"
    completed = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2600",
         f"--screenshot={screenshot}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert screenshot.exists(), completed.stderr[-2000:]
    rendered = Image.open(screenshot).convert("RGB")
    assert rendered.size == (1400, 2600)
    # The embedded figures are drawn: their colours appear in the page, which a broken
    # data URI would leave as an empty frame.
    assert _has_colour(rendered, OUR_COLOUR, minimum=50)
    assert _has_colour(rendered, PUBLISHED_COLOUR, minimum=20)
    assert _has_colour(rendered, BOX_COLOUR, minimum=50)
