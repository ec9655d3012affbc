"""The rules extractor: mentions, scoped and paper presence, knowledge bases, label matrix."""

import polars as pl
import pytest

from kad_pipeline.extraction.labels import label_matrix
from kad_pipeline.extraction.lexicon import load_obo, load_umls, tokenize_term
from kad_pipeline.extraction.rules import ENTITY_SCHEMA, RulesExtractor
from kad_pipeline.queries import KAD_QUERIES

QUERIES = list(KAD_QUERIES) + ["fibrosis"]


@pytest.fixture(scope="module")
def knowledge_base():
    return load_obo()


@pytest.fixture(scope="module")
def scoped(knowledge_base):
    return RulesExtractor(QUERIES, mode="scoped", knowledge_base=knowledge_base)


@pytest.fixture(scope="module")
def paper(knowledge_base):
    return RulesExtractor(QUERIES, mode="paper", knowledge_base=knowledge_base)


def labels_of(extractor, text: str) -> dict:
    reports = pl.DataFrame({"report_id": ["R"], "text": [text]})
    matrix = label_matrix(extractor.extract(reports), ["R"], extractor.queries)
    return matrix.row(0, named=True)


# Each case: report text, query, expected label (1 present, 0 absent, -1 uncertain, None not mentioned).
SCOPED_CASES = [
    # Negation stops at "but", "however" and a new clause.
    ("No pneumothorax, but there is a small right pleural effusion.", "pneumothorax", 0),
    ("No pneumothorax, but there is a small right pleural effusion.", "pleural effusion", 1),
    ("No pneumothorax however bilateral effusions are present.", "pleural effusion", 1),
    ("No pneumothorax, the heart is enlarged.", "cardiomegaly", 1),
    ("No focal consolidation although there is mild atelectasis.", "atelectasis", 1),
    ("No pneumothorax; moderate left pleural effusion.", "pleural effusion", 1),
    # Lists under one negation, with and without the serial comma.
    ("No focal consolidation, pleural effusion, or pneumothorax.", "consolidation", 0),
    ("No focal consolidation, pleural effusion, or pneumothorax.", "pleural effusion", 0),
    ("No focal consolidation, pleural effusion, or pneumothorax.", "pneumothorax", 0),
    ("No focal consolidation, pleural effusion or pneumothorax.", "pneumothorax", 0),
    ("No pneumonia, effusions, edema, pneumothorax, adenopathy, nodules or masses.", "mass", 0),
    ("No pneumonia, effusions, edema, pneumothorax, adenopathy, nodules or masses.", "nodule", 0),
    # "X: none", "X: no", "is negative for X".
    ("Pneumothorax: none.", "pneumothorax", 0),
    ("Pleural effusion: no.", "pleural effusion", 0),
    ("The examination is negative for pneumothorax.", "pneumothorax", 0),
    # A section header before the cue.
    ("IMPRESSION: No pneumothorax.", "pneumothorax", 0),
    ("Findings: no pleural effusion. Impression: mild edema.", "edema", 1),
    # Uncertainty.
    ("Pneumonia cannot be excluded.", "pneumonia", -1),
    ("Possible small left pleural effusion.", "pleural effusion", -1),
    ("Left basilar opacity may represent atelectasis.", "atelectasis", -1),
    ("Left basilar opacity may represent atelectasis.", "opacity", 1),
    ("Atelectasis versus pneumonia in the left base.", "atelectasis", -1),
    ("Atelectasis versus pneumonia in the left base.", "pneumonia", -1),
    ("Small bilateral pleural effusions suspected.", "pleural effusion", -1),
    # Resolution means absent now.
    ("The left pleural effusion has resolved.", "pleural effusion", 0),
    ("Interval resolution of the right pneumothorax.", "pneumothorax", 0),
    # Change statements keep the finding present.
    ("No change in the right pleural effusion.", "pleural effusion", 1),
    ("Unchanged right pleural effusion.", "pleural effusion", 1),
    ("No significant interval change in bibasilar atelectasis.", "atelectasis", 1),
    # Heart size statements.
    ("Normal heart size.", "cardiomegaly", 0),
    ("The heart size is normal.", "cardiomegaly", 0),
    ("Heart size and pulmonary vascularity are within normal limits.", "cardiomegaly", 0),
    ("The heart is not enlarged.", "cardiomegaly", 0),
    ("The heart is mildly enlarged.", "cardiomegaly", 1),
    ("Borderline cardiomegaly.", "cardiomegaly", 1),
    ("Heart size is at the upper limits of normal.", "cardiomegaly", -1),
    ("Stable heart size, enlarged and tortuous aorta.", "cardiomegaly", None),
    # A device in the same sentence as a negated finding.
    ("No pneumothorax with right chest tube in place.", "tube", 1),
    ("No pneumothorax with right chest tube in place.", "pneumothorax", 0),
    ("No pneumothorax after placement of a left PICC line.", "line", 1),
    ("Interval removal of the endotracheal tube.", "tube", 0),
    # Plurals and laterality.
    ("Bilateral pleural effusions, left greater than right.", "pleural effusion", 1),
    ("Bilateral effusions, left greater than right", "pleural effusion", 1),
    ("Multiple bilateral pulmonary nodules.", "nodule", 1),
    # Abbreviations.
    ("No PTX.", "pneumothorax", 0),
    ("Small left apical PTX.", "pneumothorax", 1),
    # A report without a final period, and one starting with a parenthesis.
    ("Heart size normal. Small left pleural effusion", "pleural effusion", 1),
    ("(Limited study) small left pleural effusion.", "pleural effusion", 1),
    ("(No pneumothorax) Mild edema.", "pneumothorax", 0),
    # Misspelling one letter off.
    ("No pneumothorax or pleural effusoin.", "pleural effusion", 0),
    # Words that are not findings.
    ("Pericardial effusion is small.", "pleural effusion", None),
    ("Calcified granuloma in the right upper lobe.", "nodule", None),
    ("Healed granulomatous disease in the right hemithorax.", "pleural effusion", None),
    ("Subcutaneous emphysema in the chest wall.", "emphysema", None),
    ("Lungs are clear.", "pneumonia", None),
    # History: a finding of the past is not present now, unless the report ties it to the image.
    ("History of right upper lobe mass.", "mass", 0),
    ("Findings consistent with previous tuberculosis pneumonia.", "pneumonia", 0),
    ("Interstitial markings consistent with history of pulmonary fibrosis.", "fibrosis", 1),
    ("Compared to the previous exam there is a new right pleural effusion.", "pleural effusion", 1),
    ("There has been previous aortic valve replacement.", "device", 1),
    # A conditional clause and a differential list hedge every finding after them.
    ("In the appropriate clinical setting, this is compatible with pneumonia.", "pneumonia", -1),
    ("Differential diagnosis includes subsegmental atelectasis, small infiltrate, scarring.", "infiltration", -1),
    ("Differential diagnosis includes subsegmental atelectasis, small infiltrate, scarring.", "atelectasis", -1),
    # More hedges and their high-probability forms.
    ("Followup is advised to exclude an underlying mass.", "mass", -1),
    ("True pulmonary nodule is a possibility.", "nodule", -1),
    ("Aspiration or edema are also possible.", "edema", -1),
    ("Question small bilateral pleural effusions.", "pleural effusion", -1),
    ("Probable interstitial edema, less XXXX fibrosis.", "fibrosis", -1),
    ("Probable interstitial edema, less XXXX fibrosis.", "edema", 1),
    ("Infiltrate is less likely but not entirely excluded.", "infiltration", -1),
    ("There may be some chronic infection here associated with some chronic consolidation.", "consolidation", -1),
    ("Findings are strongly suggestive of acute pneumonia.", "pneumonia", 1),
    ("The pulmonary nodules are not definitely seen.", "nodule", 0),
    # An adjective cue reaches forward, a cue after its finding reaches back.
    ("Small pleural effusions and questionable interstitial edema.", "edema", -1),
    ("Small pleural effusions and questionable interstitial edema.", "pleural effusion", 1),
    ("Resolved right lower lobe pneumonia.", "pneumonia", 0),
    # A negated list goes on across "or identified" and across a blocked term.
    ("No evidence of focal infiltrate, pneumothorax, or identified mass lesion.", "mass", 0),
    ("Cardiomegaly or pericardial effusion is suspected.", "cardiomegaly", -1),
    # Mass vocabulary: a masslike opacity is a mass; a tumor or neoplasm is a diagnosis.
    ("Large masslike opacity in the right lung base.", "mass", 1),
    ("Large masslike opacity in the right lung base.", "opacity", 1),
    ("Multiple nodules consistent with neoplasm.", "mass", None),
    ("Metastatic disease from known brain tumor.", "mass", None),
    # Cystic fibrosis is not the fibrosis finding.
    ("Bronchiectasis from cystic fibrosis.", "fibrosis", None),
]


@pytest.mark.parametrize("text, query, expected", SCOPED_CASES)
def test_scoped_presence(scoped, text, query, expected):
    assert labels_of(scoped, text)[query] == expected


PAPER_CASES = [
    ("No pneumothorax, but there is a small right pleural effusion.", "pleural effusion", 0),
    ("Small right pleural effusion.", "pleural effusion", 1),
    ("Pneumonia cannot be excluded.", "pneumonia", 1),
    ("Normal heart size. Mild edema.", "edema", 1),
    ("Heart size normal, mild edema.", "edema", 0),
    ("No pneumothorax.", "normal", 1),
    ("Mild edema. No pneumothorax.", "normal", 0),
]


@pytest.mark.parametrize("text, query, expected", PAPER_CASES)
def test_paper_presence(paper, text, query, expected):
    assert labels_of(paper, text)[query] == expected


# Abbreviations that a report defines: (text, query, expected label).
DEFINED_ABBREVIATION_CASES = [
    ("Moderate pleural effusion (MPE) on the left. The MPE is stable.", "pleural effusion", 1),
    ("Apical pleural thickening (APT) on the right. No APT on the left.", "pleural thicken", 1),
    ("No APT.", "pleural thicken", None),
    ("Right upper lobe (RUL) atelectasis.", "atelectasis", 1),
]


@pytest.mark.parametrize("text, query, expected", DEFINED_ABBREVIATION_CASES)
def test_report_defined_abbreviations(scoped, text, query, expected):
    assert labels_of(scoped, text)[query] == expected


def test_defined_abbreviation_entities(scoped):
    text = "Apical pleural thickening (APT) on the right. No APT on the left."
    entities = scoped.extract(pl.DataFrame({"report_id": ["R"], "text": [text]}))
    rows = entities.select("entity", "char_start", "query", "category").rows()
    # The defining "(APT)" is not a mention; the later use is, and the negation reaches it.
    assert rows == [
        ("Apical pleural thickening", 0, "pleural thicken", "OBS-DP"),
        ("APT", text.index("No APT") + 3, "pleural thicken", "OBS-DA"),
    ]


def test_abbreviation_detection_can_be_turned_off(knowledge_base):
    extractor = RulesExtractor(QUERIES, knowledge_base=knowledge_base, detect_abbreviations=False)
    text = "Apical pleural thickening (APT) on the right. No APT on the left."
    entities = extractor.extract(pl.DataFrame({"report_id": ["R"], "text": [text]}))
    assert entities["entity"].to_list() == ["Apical pleural thickening"]


def test_chf_abbreviation_is_kb_concept(scoped):
    entities = scoped.extract(pl.DataFrame({"report_id": ["R"], "text": ["No CHF."]}))
    chf = entities.filter(pl.col("entity") == "CHF").row(0, named=True)
    assert chf["cui"] == "HP:0001635"  # Congestive heart failure in HPO
    assert chf["query"] is None
    assert chf["category"] == "OBS-DA"


def test_entity_table_schema_and_offsets(scoped):
    texts = [
        "Small right pleural effusion. No pneumothorax.\nMild cardiomegaly.",
        "There are no XXXX of a pleural effusion. ___ year old with left PICC line.",
        "Pleural effusion – unchanged (café-au-lait XXXX). Mild edema.",
    ]
    reports = pl.DataFrame({"report_id": ["A", "B", "C"], "text": texts})
    entities = scoped.extract(reports)

    assert entities.schema == pl.Schema(ENTITY_SCHEMA)
    assert set(entities["extractor"].to_list()) == {"rules"}
    assert set(entities["extractor_version"].to_list()) == {scoped.version}
    for row in entities.iter_rows(named=True):
        text = texts["ABC".index(row["report_id"])]
        assert text[row["char_start"]:row["char_end"]] == row["entity"]
        assert "XXXX" not in row["entity"]
        assert "___" not in row["entity"]
    assert entities.filter(pl.col("report_id") == "C")["query"].to_list() == ["pleural effusion", "edema"]
    first = entities.filter(pl.col("report_id") == "A")
    assert first["sentence_index"].to_list() == [0, 1, 2]
    assert first["query"].to_list() == ["pleural effusion", "pneumothorax", "cardiomegaly"]
    assert first["cui"].to_list() == ["HP:0002202", "HP:0002107", "HP:0001640"]


def test_empty_reports_give_empty_table(scoped):
    entities = scoped.extract(pl.DataFrame(schema={"report_id": pl.String(), "text": pl.String()}))
    assert entities.height == 0
    assert entities.schema == pl.Schema(ENTITY_SCHEMA)


def test_missing_text_column_raises(scoped):
    with pytest.raises(ValueError, match="missing column"):
        scoped.extract(pl.DataFrame({"report_id": ["A"]}))


def test_version_depends_on_mode_and_queries(knowledge_base, scoped, paper):
    narrow = RulesExtractor(["pneumothorax"], knowledge_base=knowledge_base)
    assert scoped.version != paper.version
    assert scoped.version != narrow.version
    assert scoped.version == RulesExtractor(QUERIES, knowledge_base=knowledge_base).version


def test_invalid_mode_raises(knowledge_base):
    with pytest.raises(ValueError, match="unknown presence mode"):
        RulesExtractor(mode="strict", knowledge_base=knowledge_base)


def test_query_outside_own_lexicon_uses_kb(knowledge_base):
    extractor = RulesExtractor(["bronchiectasis"], knowledge_base=knowledge_base)
    row = labels_of(extractor, "Mild bronchiectasis in the lower lobes.")
    assert row["bronchiectasis"] == 1


# ---------------------------------------------------------------- knowledge bases


def test_obo_loader_filters_obsolete_and_layperson(tmp_path):
    obo = tmp_path / "tiny.obo"
    obo.write_text(
        "format-version: 1.2\ndata-version: tiny/2024\n\n"
        "[Term]\nid: T:1\nname: Pleural effusion\n"
        'synonym: "Hydrothorax" EXACT []\n'
        'synonym: "Fluid around lungs" EXACT layperson []\n'
        'synonym: "Water" RELATED []\n\n'
        "[Term]\nid: T:2\nname: Loculated pleural effusion\nis_a: T:1 ! Pleural effusion\n\n"
        "[Term]\nid: T:3\nname: Old term\nis_obsolete: true\n\n"
        "[Typedef]\nid: part_of\nname: part of\n"
    )
    kb = load_obo(obo)
    assert set(kb.concepts) == {"T:1", "T:2"}
    assert kb.concepts["T:1"].synonyms == ["Hydrothorax"]
    assert kb.descendants("T:1") == {"T:1", "T:2"}
    assert kb.source == "obo:tiny.obo:tiny/2024"


def test_umls_semantic_type_filter(tmp_path):
    mrconso = tmp_path / "MRCONSO.RRF"
    mrsty = tmp_path / "MRSTY.RRF"

    def conso(cui, string, ts="P", stt="PF", ispref="Y", lat="ENG", suppress="N"):
        fields = [cui, lat, ts, "L1", stt, "S1", ispref, "A1", "", "", "", "MSH", "PT", "D1", string, "0", suppress, ""]
        return "|".join(fields) + "\n"

    mrconso.write_text(
        conso("C0032227", "Pleural effusion disorder")
        + conso("C0032227", "Pleural Effusion", ts="S", stt="VO", ispref="N")
        + conso("C0032227", "Epanchement pleural", lat="FRE")
        + conso("C0032227", "Obsolete effusion string", ts="S", suppress="O")
        + conso("C0085590", "Chest tube", ts="P")
        + conso("C0009999", "Effusion of light")
    )
    mrsty.write_text(
        "C0032227|T046|B2.2.1.2|Pathologic Function|AT1|\n"
        "C0085590|T074|A1.3.1|Medical Device|AT2|\n"
        "C0009999|T070|B2.3|Natural Phenomenon or Process|AT3|\n"
    )
    kb = load_umls(mrconso, mrsty)
    assert set(kb.concepts) == {"C0032227", "C0085590"}
    effusion = kb.concepts["C0032227"]
    assert effusion.preferred_name == "Pleural effusion disorder"
    assert effusion.synonyms == ["Pleural Effusion"]
    assert effusion.semantic_types == ["Pathologic Function"]

    narrow = load_umls(mrconso, mrsty, semantic_types=["T033", "T047"])
    assert narrow.concepts == {}

    extractor = RulesExtractor(["pleural effusion", "tube"], knowledge_base=kb)
    entities = extractor.extract(pl.DataFrame({"report_id": ["A"], "text": ["Small pleural effusion. Chest tube in place."]}))
    assert entities["cui"].to_list() == ["C0032227", "C0085590"]
    assert entities["semantic_type"].to_list() == ["Pathologic Function", "Medical Device"]


def test_umls_malformed_line_raises(tmp_path):
    mrconso = tmp_path / "MRCONSO.RRF"
    mrsty = tmp_path / "MRSTY.RRF"
    mrsty.write_text("C1|T046|B|Pathologic Function|AT|\n")
    mrconso.write_text("C1|ENG|P\n")
    with pytest.raises(ValueError, match="expected 18 MRCONSO fields"):
        load_umls(mrconso, mrsty)


def test_tokenize_term_drops_punctuation():
    assert tokenize_term("Plate-like atelectasis") == ("plate", "like", "atelectasis")


# ---------------------------------------------------------------- label matrix


def entity_rows(rows):
    base = {"sentence_index": 0, "char_start": 0, "char_end": 1, "entity": "x", "cui": None,
            "semantic_type": None, "extractor": "test", "extractor_version": "1"}
    return pl.DataFrame([{**base, "report_id": r, "query": q, "category": c} for r, q, c in rows], schema=ENTITY_SCHEMA)


def test_label_matrix_aggregation_and_normal():
    entities = entity_rows([
        ("A", "pneumothorax", "OBS-DA"), ("A", "pneumothorax", "OBS-U"), ("A", "pneumothorax", "OBS-DP"),
        ("B", "pneumothorax", "OBS-DA"), ("B", "edema", "OBS-U"), ("B", "edema", "OBS-DA"),
        ("C", "pneumothorax", "OBS-DA"), ("C", None, "OBS-DP"),
        ("D", None, "OBS-DP"),
        ("Z", "edema", "OBS-DP"),
    ])
    matrix = label_matrix(entities, ["A", "B", "C", "D", "E"], ["normal", "pneumothorax", "edema"])

    assert matrix.columns == ["report_id", "normal", "pneumothorax", "edema"]
    assert matrix.schema["pneumothorax"] == pl.Int8
    assert matrix.rows() == [
        ("A", 0, 1, None),
        ("B", -1, 0, -1),
        ("C", 1, 0, None),
        ("D", 1, None, None),
        ("E", None, None, None),
    ]


def test_label_matrix_counts_queries_outside_columns():
    # A present finding makes the report abnormal even when its column is not requested.
    entities = entity_rows([("A", "edema", "OBS-DP")])
    assert label_matrix(entities, ["A"], ["normal"]).rows() == [("A", 0)]


def test_label_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicates"):
        label_matrix(entity_rows([]), ["A"], ["edema", "edema"])
    with pytest.raises(ValueError, match="unknown entity categories"):
        label_matrix(entity_rows([("A", "edema", "PRESENT")]), ["A"], ["edema"])
