"""Image decoding (bit depths, colour modes, broken files) and the manifest readers."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest
from PIL import Image

from kad_pipeline.images.io import ImageDecodeError, decode_image, resize_square
from kad_pipeline.images.manifest import generic_manifest, hash_split, mimic_cxr_manifest


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_gray_8bit_png_is_exact(tmp_path):
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(pixels).save(tmp_path / "gray.png")
    decoded = decode_image(tmp_path / "gray.png")
    assert decoded.dtype == np.uint8
    assert np.array_equal(decoded, pixels)


def test_16bit_png_stretches_own_range():
    values = np.array([[100, 1100], [2100, 4195]], dtype=np.uint16)  # a 12-bit style range
    data = _png_bytes(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    decoded = decode_image(data)
    expected = np.round((values.astype(float) - 100) * 255 / (4195 - 100)).astype(np.uint8)
    assert np.array_equal(decoded, expected)
    assert decoded.tolist() == [[0, 62], [125, 255]]


def test_16bit_constant_png_is_black():
    data = _png_bytes(Image.fromarray(np.full((4, 4), 3000, dtype=np.uint16)))
    assert decode_image(data).max() == 0


def test_rgb_png_uses_luma():
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[1, 0] = (0, 0, 255)
    rgb[1, 1] = (100, 100, 100)
    decoded = decode_image(_png_bytes(Image.fromarray(rgb)))
    # ITU-R 601-2: L = 0.299 R + 0.587 G + 0.114 B
    assert decoded.tolist() == [[76, 150], [29, 100]]


def test_rgba_png_composites_over_black():
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 200, 200, 255)
    rgba[0, 1] = (200, 200, 200, 0)
    decoded = decode_image(_png_bytes(Image.fromarray(rgba)))
    assert decoded.tolist() == [[200, 0]]


def test_jpeg_decodes_close_to_source(tmp_path):
    pixels = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    Image.fromarray(pixels).save(tmp_path / "image.jpg", quality=95)
    decoded = decode_image(tmp_path / "image.jpg")
    assert decoded.shape == (64, 64)
    assert np.abs(decoded.astype(int) - pixels.astype(int)).max() <= 6


def test_rgb_jpeg_decodes_to_gray(tmp_path):
    Image.new("RGB", (20, 10), (90, 90, 90)).save(tmp_path / "rgb.jpg")
    decoded = decode_image(tmp_path / "rgb.jpg")
    assert decoded.shape == (10, 20)
    assert abs(int(decoded.mean()) - 90) <= 2


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_reported(fmt):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)).save(buffer, format=fmt)
    data = buffer.getvalue()
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data[: len(data) // 2])
    assert caught.value.reason == "truncated"


def test_broken_inputs_have_reasons(tmp_path):
    cases = {"missing": tmp_path / "absent.png", "empty": b"", "unreadable": b"this is not an image at all"}
    for reason, source in cases.items():
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(source)
        assert caught.value.reason == reason


def test_resize_square_shape_and_level():
    resized = resize_square(np.full((50, 40), 77, dtype=np.uint8), 32)
    assert resized.shape == (32, 32)
    assert set(np.unique(resized)) == {77}


def _write_mimic(root):
    rows = [  # dicom_id, subject_id, study_id, view, split
        ("d1", "10000001", "50000001", "PA", "train"),
        ("d2", "10000001", "50000001", "LATERAL", "train"),
        ("d3", "10000002", "50000002", "AP", "validate"),
        ("d4", "10000003", "50000003", "AP", "test"),
        ("d5", "10000004", "50000004", "PA", "test"),
    ]
    pl.DataFrame({"dicom_id": [r[0] for r in rows], "subject_id": [r[1] for r in rows],
                  "study_id": [r[2] for r in rows], "ViewPosition": [r[3] for r in rows]}
                 ).write_csv(root / "mimic-cxr-2.0.0-metadata.csv")
    pl.DataFrame({"dicom_id": [r[0] for r in rows], "study_id": [r[2] for r in rows],
                  "subject_id": [r[1] for r in rows], "split": [r[4] for r in rows]}
                 ).write_csv(root / "mimic-cxr-2.0.0-split.csv")
    for dicom, subject, study, _, _ in rows:
        if dicom == "d4":
            continue  # listed but absent
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 50).save(folder / f"{dicom}.jpg")


def test_mimic_manifest_joins_reports_by_study(tmp_path):
    _write_mimic(tmp_path)
    reports = pl.DataFrame({"report_id": ["r1", "r2", "r3"], "study_id": ["s50000001", "50000002", "s50000003"]})
    result = mimic_cxr_manifest(tmp_path, reports)
    manifest = result.manifest.sort("image_id")
    assert manifest["image_id"].to_list() == ["d1", "d3"]
    assert manifest["report_id"].to_list() == ["r1", "r2"]
    assert manifest["split"].to_list() == ["train", "valid"]
    assert manifest["source"].unique().to_list() == ["mimic"]
    assert manifest["path"][0].endswith("files/p10/p10000001/s50000001/d1.jpg")
    reasons = dict(zip(result.quarantine["image_id"].to_list(), result.quarantine["reason"].to_list()))
    assert reasons == {"d5": "no-report", "d4": "missing-file"}


def test_mimic_manifest_all_views_without_reports(tmp_path):
    _write_mimic(tmp_path)
    result = mimic_cxr_manifest(tmp_path, views=None)
    assert sorted(result.manifest["image_id"].to_list()) == ["d1", "d2", "d3", "d5"]
    assert result.manifest.filter(pl.col("image_id") == "d2")["report_id"].item() == "s50000001"


def test_generic_manifest_with_labels(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a", "b"):
        Image.new("L", (8, 8)).save(tmp_path / "img" / f"{name}.png")
    pl.DataFrame({"path": ["img/a.png", "img/b.png", "img/c.png"],
                  "labels": ["effusion|mass", "", "mass"],
                  "split": ["train", "val", "test"]}).write_csv(tmp_path / "manifest.csv")
    result = generic_manifest(tmp_path / "manifest.csv")
    assert result.manifest["image_id"].to_list() == ["a", "b"]
    assert result.manifest["split"].to_list() == ["train", "valid"]
    assert result.quarantine["reason"].to_list() == ["missing-file"]
    labels = result.labels.sort("report_id")
    assert labels.columns == ["report_id", "effusion", "mass"]
    assert labels.row(0) == ("a", 1, 1)
    assert labels.row(1) == ("b", 0, 0)


def test_generic_manifest_needs_report_or_labels(tmp_path):
    pl.DataFrame({"path": ["x.png"]}).write_csv(tmp_path / "m.csv")
    with pytest.raises(ValueError, match="'report_id' or a 'labels' column"):
        generic_manifest(tmp_path / "m.csv")


def test_hash_split_is_stable_and_proportional():
    splits = [hash_split(f"patient{i}") for i in range(5000)]
    assert hash_split("patient1") == splits[1]
    shares = {name: splits.count(name) / len(splits) for name in ("train", "valid", "test")}
    assert shares["test"] == pytest.approx(0.2, abs=0.02)
    assert shares["valid"] == pytest.approx(0.1, abs=0.02)
