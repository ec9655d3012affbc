"""Pointing game on hand-built attention maps and boxes."""

import numpy as np
import polars as pl
import pytest

from kad_pipeline.evaluation.grounding import attention_peak, point_in_boxes, pointing_game


def test_peak_of_single_hot_cell():
    attention = np.zeros((4, 4), dtype=np.float32)
    attention[1, 2] = 1.0  # row 1, column 2 of a 4x4 grid over a 100x100 image
    x, y = attention_peak(attention, 100, 100)
    # The cell covers x in [50, 75) and y in [25, 50); bilinear upsampling peaks at its centre.
    assert 50 <= x <= 75
    assert 25 <= y <= 50
    assert abs(x - 62.5) <= 1.0
    assert abs(y - 37.5) <= 1.0


def test_peak_on_non_square_image():
    attention = np.zeros((2, 2), dtype=np.float32)
    attention[1, 0] = 1.0  # bottom-left cell
    x, y = attention_peak(attention, 40, 200)
    assert x < 100
    assert y > 20


def test_peak_same_size_is_argmax_pixel_centre():
    attention = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert attention_peak(attention, 3, 4) == (3.5, 2.5)


def test_peak_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        attention_peak(np.array([[np.nan, 1.0]]), 2, 2)


def test_point_in_boxes_borders_count():
    boxes = np.array([[10, 10, 20, 20], [50, 50, 60, 70]])
    assert point_in_boxes(10, 20, boxes)
    assert point_in_boxes(55, 65, boxes)
    assert not point_in_boxes(30, 30, boxes)
    assert not point_in_boxes(20.01, 15, boxes)


def _hot(row, col, size=4):
    attention = np.zeros((size, size), dtype=np.float32)
    attention[row, col] = 1.0
    return attention


def test_pointing_game_hits_and_summary():
    # Images are 80x80 and maps 4x4, so cell (r, c) peaks near (20c + 10, 20r + 10).
    attention = {
        ("img1", "pleural effusion"): _hot(3, 0),  # peak near (10, 70): inside the box
        ("img1", "cardiomegaly"): _hot(0, 0),  # peak near (10, 10): outside (40..60)
        ("img2", "pleural effusion"): _hot(0, 3),  # peak near (70, 10): inside the second box only
    }
    boxes = pl.DataFrame({
        "image_id": ["img1", "img1", "img2", "img2"],
        "finding": ["pleural effusion", "cardiomegaly", "pleural effusion", "pleural effusion"],
        "x0": [0.0, 40.0, 0.0, 60.0], "y0": [60.0, 40.0, 60.0, 0.0],
        "x1": [20.0, 60.0, 20.0, 80.0], "y1": [80.0, 60.0, 80.0, 20.0],
    })
    sizes = {"img1": (80, 80), "img2": (80, 80)}
    points, summary = pointing_game(attention, boxes, sizes)

    assert points.height == 3
    hits = {(r["image_id"], r["finding"]): r["hit"] for r in points.iter_rows(named=True)}
    assert hits == {("img1", "pleural effusion"): True, ("img1", "cardiomegaly"): False,
                    ("img2", "pleural effusion"): True}
    assert points.filter(pl.col("image_id") == "img2").row(0, named=True)["boxes"] == 2

    rows = {r["finding"]: r for r in summary.iter_rows(named=True)}
    assert rows["pleural effusion"]["hits"] == 2
    assert rows["pleural effusion"]["hit_rate"] == 1.0
    assert rows["cardiomegaly"]["hit_rate"] == 0.0
    assert rows["overall"]["pairs"] == 3
    assert rows["overall"]["hit_rate"] == pytest.approx(2 / 3)


def test_pointing_game_missing_map_raises():
    boxes = pl.DataFrame({"image_id": ["img1"], "finding": ["edema"], "x0": [0.0], "y0": [0.0],
                          "x1": [1.0], "y1": [1.0]})
    with pytest.raises(ValueError, match="no attention map"):
        pointing_game({}, boxes, {"img1": (10, 10)})
