"""Synthetic radiographs: MeSH mapping, determinism and recorded boxes."""

import numpy as np
import polars as pl
import pytest
from PIL import Image

from kad_pipeline.images.synthetic import (
    PlantedFinding,
    draw_radiograph,
    findings_from_mesh,
    generate_openi_images,
    split_of,
)


@pytest.mark.parametrize(
    ("mesh", "expected"),
    [
        (["Pleural Effusion/right/small"], [("pleural effusion", "right", "any", 0.7)]),
        (["Pulmonary Atelectasis/base/left"], [("atelectasis", "left", "base", 1.0)]),
        (["Cardiomegaly/severe"], [("cardiomegaly", "any", "any", 1.4)]),
        (["Opacity/lung/lingula"], [("opacity", "left", "middle", 1.0)]),
        (["Pleural Effusion"], [("pleural effusion", "bilateral", "any", 1.0)]),
        (["normal"], []),
        (["Thoracic Vertebrae/degenerative"], []),
    ],
)
def test_findings_from_mesh(mesh, expected):
    found = [(f.finding, f.side, f.zone, f.severity) for f in findings_from_mesh(mesh)]
    assert found == expected


def test_same_id_draws_same_pixels():
    findings = findings_from_mesh(["Nodule/lung/upper lobe/left"])
    first = draw_radiograph("CXR10_IM-0001-1001", findings)
    second = draw_radiograph("CXR10_IM-0001-1001", findings)
    assert np.array_equal(first.pixels, second.pixels)
    assert first.boxes == second.boxes


def test_right_effusion_is_on_image_left_base():
    drawn = draw_radiograph("id", [PlantedFinding("pleural effusion", "right", "any", 1.0, "Pleural Effusion/right")])
    (box,) = drawn.boxes
    size = drawn.pixels.shape[0]
    assert box["x1"] <= size // 2, "the patient's right is on the image's left"
    assert (box["y0"] + box["y1"]) / 2 > 0.55 * size, "an effusion fills the lung base"


def test_planted_finding_changes_pixels_inside_its_box():
    finding = PlantedFinding("mass", "left", "middle", 1.0, "Mass/lung")
    plain = draw_radiograph("same-patient", []).pixels.astype(int)
    drawn = draw_radiograph("same-patient", [finding])
    (box,) = drawn.boxes
    inside = np.abs(drawn.pixels.astype(int) - plain)[box["y0"]:box["y1"], box["x0"]:box["x1"]]
    assert inside.mean() > 40, "a mass is a bright blob over the dark lung"


def test_generate_writes_manifest_and_annotations(tmp_path):
    reports = pl.DataFrame({
        "report_id": ["CXR1", "CXR2", "CXR3"],
        "image_ids": [["CXR1_IM-1"], ["CXR2_IM-1", "CXR2_IM-2"], []],
        "mesh": [["normal"], ["Cardiomegaly/mild", "Pleural Effusion/left"], ["Mass"]],
    })
    manifest, annotations = generate_openi_images(reports, tmp_path, size=64)
    assert manifest["image_id"].to_list() == ["CXR1_IM-1", "CXR2_IM-1"]
    assert manifest["split"].to_list() == [split_of("CXR1"), split_of("CXR2")]
    assert sorted(annotations["finding"].to_list()) == ["cardiomegaly", "pleural effusion"]
    assert set(annotations["image_id"]) == {"CXR2_IM-1"}
    for row in annotations.iter_rows(named=True):
        assert 0 <= row["x0"] < row["x1"] <= 64
        assert 0 <= row["y0"] < row["y1"] <= 64
    image = Image.open(manifest["path"][1])
    assert image.mode == "L"
    assert image.size == (64, 64)


def test_split_fractions_close_to_targets():
    splits = [split_of(f"CXR{i}") for i in range(5000)]
    assert abs(splits.count("test") / 5000 - 0.2) < 0.02
    assert abs(splits.count("valid") / 5000 - 0.1) < 0.02
