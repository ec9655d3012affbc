"""Readers of the evaluation datasets on small files in their real formats."""

import csv
import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from kad_pipeline.evaluation import datasets as d

XRV_DATA = None
try:
    import torchxrayvision

    XRV_DATA = Path(torchxrayvision.__file__).parent / "data"
except ImportError:  # pragma: no cover - the package is a project dependency
    pass


def _xrv_file(name: str) -> Path:
    if XRV_DATA is None or not (XRV_DATA / name).exists():
        pytest.skip(f"torchxrayvision data file {name} is not installed")
    return XRV_DATA / name


def _head_of_gzip(source: Path, target: Path, records: int) -> Path:
    """Copy the header and the first data records of a gzipped CSV (records may span lines)."""
    with gzip.open(source, "rt", encoding="utf-8", newline="") as handle, \
            open(target, "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        for _, record in zip(range(records), csv.reader(handle)):
            writer.writerow(record)
    return target


DATA_ENTRY = """Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]
00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143
00000001_001.png,Cardiomegaly|Effusion,1,1,58,M,PA,2894,2729,0.143,0.143
00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171
00000003_000.png,Hernia|Pleural_Thickening,0,3,81,F,PA,2582,2991,0.143,0.143
00000004_000.png,Mass|Nodule,0,4,82,M,AP,2500,2048,0.168,0.168
00000005_000.png,Unknown Thing,0,5,69,F,PA,2048,2500,0.168,0.168
"""


def test_chestxray14_labels_and_splits(tmp_path):
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text(DATA_ENTRY)
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000003_000.png\n00000004_000.png\n")
    result = d.read_chestxray14(tmp_path / "Data_Entry_2017_v2020.csv", tmp_path / "train_val_list.txt",
                                tmp_path / "test_list.txt", validation_fraction=0.5, seed=1)

    assert result.queries == ["atelectasis", "cardiomegaly", "pleural effusion", "infiltration", "lung mass",
                              "lung nodule", "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema",
                              "fibrosis", "pleural thicken", "hernia"]
    rows = {r["image_id"]: r for r in result.labels.iter_rows(named=True)}
    assert rows["00000001_001.png"]["cardiomegaly"] == 1
    assert rows["00000001_001.png"]["pleural effusion"] == 1
    assert rows["00000001_001.png"]["hernia"] == 0
    assert sum(rows["00000002_000.png"][q] for q in result.queries) == 0
    assert rows["00000003_000.png"]["pleural thicken"] == 1
    assert rows["00000004_000.png"]["lung mass"] == rows["00000004_000.png"]["lung nodule"] == 1
    assert rows["00000003_000.png"]["split"] == "test"

    # Patient 1's two images share one split; the split follows the stable hash.
    assert rows["00000001_000.png"]["split"] == rows["00000001_001.png"]["split"]
    expected = "valid" if d.patient_in_validation("1", 0.5, 1) else "train"
    assert rows["00000001_000.png"]["split"] == expected

    assert result.quarantine.height == 1
    assert result.quarantine.row(0, named=True)["reason"] == "unknown-finding"


def test_chestxray14_split_lists_overlap_raises(tmp_path):
    (tmp_path / "entry.csv").write_text(DATA_ENTRY)
    (tmp_path / "a.txt").write_text("00000001_000.png\n")
    (tmp_path / "b.txt").write_text("00000001_000.png\n")
    with pytest.raises(ValueError, match="both split lists"):
        d.read_chestxray14(tmp_path / "entry.csv", tmp_path / "a.txt", tmp_path / "b.txt")


def test_chestxray14_custom_mapping(tmp_path):
    (tmp_path / "entry.csv").write_text(DATA_ENTRY)
    mapping_file = tmp_path / "map.json"
    mapping_file.write_text(json.dumps({**d.CHESTXRAY14_QUERIES, "Unknown Thing": "mystery",
                                        "Effusion": "effusion"}))
    result = d.read_chestxray14(tmp_path / "entry.csv", mapping=d.load_query_mapping(mapping_file))
    assert "mystery" in result.queries
    assert "effusion" in result.queries
    assert result.quarantine.height == 0
    assert result.labels.get_column("split").null_count() == result.labels.height


def test_chestxray14_real_table_head(tmp_path):
    source = _xrv_file("Data_Entry_2017_v2020.csv.gz")
    small = _head_of_gzip(source, tmp_path / "Data_Entry_2017_v2020.csv", 201)
    result = d.read_chestxray14(small)
    assert result.labels.height == 200
    assert result.quarantine.height == 0
    first = result.labels.row(0, named=True)
    assert first["image_id"] == "00000001_000.png"
    assert first["cardiomegaly"] == 1
    assert first["patient_id"] == "1"


CHEXPERT_VALID = """Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices
CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,0.0,1.0,1.0,1.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0
CheXpert-v1.0/valid/patient64542/study1/view1_frontal.jpg,Male,70,Frontal,PA,0.0,0.0,0.0,1.0,0.0,0.0,0.0,0.0,1.0,0.0,1.0,0.0,0.0,1.0
CheXpert-v1.0/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,,,-1.0,,1.0,,1.0,
"""

CHEXPERT_TEST = """Study,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices
test/patient64741/study1,1,0,0,0,0,0,0,1,0,1,0,0,0,1
test/patient64742/study1,0,1,0,1,1,0,0,1,0,0,0,0,0,0
"""


@pytest.mark.parametrize("rule,expected", [("exclude", None), ("positive", 1), ("negative", 0)])
def test_chexpert_uncertain_rule(tmp_path, rule, expected):
    (tmp_path / "valid.csv").write_text(CHEXPERT_VALID)
    result = d.read_chexpert(tmp_path / "valid.csv", uncertain=rule)
    assert result.queries == ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion"]
    rows = {r["image_id"].split("/")[2]: r for r in result.labels.iter_rows(named=True)}
    assert rows["patient64541"]["cardiomegaly"] == 1
    assert rows["patient64541"]["edema"] == 1
    assert rows["patient64542"]["atelectasis"] == 1
    assert rows["patient64541"]["split"] == "valid"
    uncertain_row = rows["patient00002"]
    assert uncertain_row["split"] == "train"
    assert uncertain_row["cardiomegaly"] == expected
    assert uncertain_row["consolidation"] == 0  # blank: not mentioned
    assert uncertain_row["pleural effusion"] == 1


def test_chexpert_test_layout(tmp_path):
    (tmp_path / "groundtruth.csv").write_text(CHEXPERT_TEST)
    result = d.read_chexpert(tmp_path / "groundtruth.csv")
    assert result.labels.get_column("split").to_list() == ["test", "test"]
    first = result.labels.row(0, named=True)
    assert first["image_id"] == "test/patient64741/study1"
    assert first["patient_id"] == "patient64741"
    assert (first["atelectasis"], first["pleural effusion"], first["cardiomegaly"]) == (1, 1, 0)


def test_chexpert_all_observations(tmp_path):
    (tmp_path / "groundtruth.csv").write_text(CHEXPERT_TEST)
    result = d.read_chexpert(tmp_path / "groundtruth.csv", observations=tuple(d.CHEXPERT_QUERIES))
    assert len(result.queries) == 14
    assert result.labels.row(0, named=True)["device"] == 1


def test_chexpert_real_train_head(tmp_path):
    source = _xrv_file("chexpert_train.csv.gz")
    small = _head_of_gzip(source, tmp_path / "train.csv", 101)
    result = d.read_chexpert(small, uncertain="exclude")
    assert result.labels.height == 100
    # Row 2 of the file has -1 for all five competition findings except pleural effusion.
    second = result.labels.row(1, named=True)
    assert second["cardiomegaly"] is None
    assert second["edema"] is None


PADCHEST_HEADER = ("ImageID,ImageDir,PatientID,MethodLabel,Labels,Localizations")
PADCHEST_ROWS = [
    'img1.png,0,p1,Physician,"[\'normal\']",[]',
    'img2.png,0,p2,RNN_model,"[\'pleural effusion\', \'cardiomegaly\']","[\'loc basal\']"',
    'img3.png,1,p3,Physician,"[\'cardiomegaly\', \' atelectasis\']",[]',
    'img4.png,1,p4,RNN_model,nan,[]',
    'img5.png,1,p5,Physician,"[\'exclude\']",[]',
]


def test_padchest_labels_and_quarantine(tmp_path):
    path = tmp_path / "padchest.csv"
    path.write_text("\n".join([PADCHEST_HEADER, *PADCHEST_ROWS]) + "\n")
    result = d.read_padchest(path)
    assert result.queries == ["atelectasis", "cardiomegaly", "normal", "pleural effusion"]
    rows = {r["image_id"]: r for r in result.labels.iter_rows(named=True)}
    assert rows["img2.png"]["pleural effusion"] == 1
    assert rows["img2.png"]["normal"] == 0
    assert rows["img3.png"]["atelectasis"] == 1  # surrounding spaces are stripped
    assert set(rows) == {"img1.png", "img2.png", "img3.png", "img5.png"}
    assert result.quarantine.row(0, named=True)["image_id"] == "img4.png"


def test_padchest_annotated_subset_and_queries(tmp_path):
    path = tmp_path / "padchest.csv"
    path.write_text("\n".join([PADCHEST_HEADER, *PADCHEST_ROWS]) + "\n")
    result = d.read_padchest(path, annotated_only=True, queries=["cardiomegaly", "pneumonia"])
    assert result.labels.get_column("image_id").to_list() == ["img1.png", "img3.png", "img5.png"]
    assert result.labels.get_column("cardiomegaly").to_list() == [0, 1, 0]
    assert result.labels.get_column("pneumonia").to_list() == [0, 0, 0]


def test_padchest_real_table_head(tmp_path):
    source = _xrv_file("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz")
    small = _head_of_gzip(source, tmp_path / "padchest.csv", 301)
    result = d.read_padchest(small)
    assert result.labels.height + result.quarantine.height == 300
    rows = {r["image_id"]: r for r in result.labels.iter_rows(named=True)}
    # Second data row lists pulmonary fibrosis, chronic changes, kyphosis, pseudonodule, ground glass.
    second = rows["135803415504923515076821959678074435083_fzis7d.png"]
    assert second["pulmonary fibrosis"] == 1
    assert second["kyphosis"] == 1
    assert rows["20536686640136348236148679891455886468_k6ga29.png"]["normal"] == 1


def test_nih_boxes_fixture(tmp_path):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                    "00013118_008.png,Atelectasis,225.0,547.0,86.0,79.0\n"
                    "00014716_007.png,Infiltrate,10,20,30,40\n")
    boxes = d.read_nih_boxes(path)
    assert boxes.row(0, named=True) == {"image_id": "00013118_008.png", "finding": "atelectasis",
                                        "x0": 225.0, "y0": 547.0, "x1": 311.0, "y1": 626.0}
    assert boxes.row(1, named=True)["finding"] == "infiltration"


def test_nih_boxes_real_file():
    boxes = d.read_nih_boxes(_xrv_file("BBox_List_2017.csv.gz"))
    assert boxes.height == 984
    assert set(boxes.get_column("finding")) == {"atelectasis", "cardiomegaly", "pleural effusion", "infiltration",
                                                "lung mass", "lung nodule", "pneumonia", "pneumothorax"}
    assert (boxes.get_column("x1") > boxes.get_column("x0")).all()


def test_nih_boxes_unknown_finding_raises(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\nimg.png,Wobble,1,2,3,4\n")
    with pytest.raises(ValueError, match="Wobble"):
        d.read_nih_boxes(path)


def test_chestx_det10(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([
        {"file_name": "36199.png", "syms": ["Effusion", "Nodule"], "boxes": [[10, 20, 110, 220], [5, 5, 15, 15]]},
        {"file_name": "36200.png", "syms": [], "boxes": []},
        {"file_name": "36201.png", "syms": ["Mass"], "boxes": []},
    ]))
    labels, boxes = d.read_chestx_det10(path)
    assert labels.labels.height == 2
    first = labels.labels.row(0, named=True)
    assert first["pleural effusion"] == 1
    assert first["lung nodule"] == 1
    assert first["atelectasis"] == 0
    assert sum(labels.labels.row(1, named=True)[q] for q in labels.queries) == 0
    assert boxes.height == 2
    assert boxes.row(0, named=True)["x1"] == 110.0
    assert labels.quarantine.row(0, named=True)["reason"] == "box-count-mismatch"


def test_labels_from_annotations():
    annotations = pl.DataFrame({"image_id": ["a", "a", "b"], "finding": ["edema", "edema", "cardiomegaly"],
                                "x0": [0.0] * 3, "y0": [0.0] * 3, "x1": [1.0] * 3, "y1": [1.0] * 3})
    labels = d.labels_from_annotations(["a", "b", "c"], annotations, ["edema", "cardiomegaly"])
    assert labels.get_column("edema").to_list() == [1, 0, 0]
    assert labels.get_column("cardiomegaly").to_list() == [0, 1, 0]
