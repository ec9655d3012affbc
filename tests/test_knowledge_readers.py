"""Tests of the knowledge-graph readers, restrictions and stage-1 sample building."""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import polars as pl
import pytest

from kad_pipeline.knowledge import (
    MisalignedFilesError,
    build_stage1_samples,
    held_out_ids,
    match_query_concepts,
    read_kad_csv,
    read_obo,
    read_umls,
    restrict_graph,
)
from kad_pipeline.knowledge.obo import default_obo_path, parse_quoted
from kad_pipeline.knowledge.umls import MRREL_COLUMNS, iter_mrrel, iter_rrf, read_mrconso

FIXTURES = Path(__file__).parent / "fixtures" / "knowledge"


def by_id(frame: pl.DataFrame, concept_id: str) -> dict:
    rows = frame.filter(pl.col("concept_id") == concept_id).to_dicts()
    assert len(rows) == 1, f"expected one row for {concept_id}, found {len(rows)}"
    return rows[0]


# --- OBO ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def obo_graph():
    return read_obo(FIXTURES / "tiny.obo")


def test_obo_concepts_and_synonyms(obo_graph):
    ids = set(obo_graph.concepts["concept_id"])
    assert ids == {"TP:0000001", "TP:0000002", "TP:0000003", "TP:0000004", "TP:0000005", "TP:0000006"}
    lung = by_id(obo_graph.concepts, "TP:0000002")
    assert lung["preferred_name"] == "Abnormality of the lung"
    # EXACT kept; RELATED and the obsolete_synonym type dropped by default.
    assert lung["synonyms"] == ["Lung abnormality"]
    effusion = by_id(obo_graph.concepts, "TP:0000003")
    # A synonym equal to the name (case-insensitive) is not repeated.
    assert effusion["synonyms"] == ["Fluid in the chest"]
    assert effusion["semantic_types"] == ["test_phenotype"]
    assert by_id(obo_graph.concepts, "TP:0000005")["semantic_types"] == ["anatomy"]


def test_obo_definitions_unescaped(obo_graph):
    definition = by_id(obo_graph.definitions, "TP:0000002")["definition"]
    assert definition == 'A deviation from the normal "structure" of the lung.'
    assert "TP:0000001" not in set(obo_graph.definitions["concept_id"])
    assert obo_graph.definitions.height == 5


def test_obo_triplets(obo_graph):
    rows = set(obo_graph.triplets.select("head_id", "relation", "tail_id").iter_rows())
    assert rows == {
        ("TP:0000002", "is a", "TP:0000001"),
        ("TP:0000003", "is a", "TP:0000002"),
        ("TP:0000003", "part of", "TP:0000005"),
        ("TP:0000004", "is a", "TP:0000002"),
    }
    effusion_part = obo_graph.triplets.filter(pl.col("relation") == "part of").row(0, named=True)
    assert effusion_part["head"] == "Pleural effusion"
    assert effusion_part["tail"] == "Pleura"


def test_obo_rejected_rows_have_reasons(obo_graph):
    reasons = sorted(obo_graph.rejected["reason"].to_list())
    assert reasons == ["duplicate-id", "malformed-line", "missing-id", "obsolete-target", "unknown-target"]
    assert obo_graph.rejected["location"].str.starts_with("line ").all()


def test_obo_synonym_scopes_option():
    graph = read_obo(FIXTURES / "tiny.obo", synonym_scopes=("EXACT", "RELATED"))
    assert by_id(graph.concepts, "TP:0000002")["synonyms"] == ["Lung abnormality", "Pulmonary anomaly"]


def test_parse_quoted_errors():
    assert parse_quoted('"a \\"b\\" c" [x]') == ('a "b" c', "[x]")
    with pytest.raises(ValueError, match="unterminated"):
        parse_quoted('"no end')
    with pytest.raises(ValueError, match="quoted"):
        parse_quoted("bare text")


def test_obo_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="OBO file not found"):
        read_obo(tmp_path / "absent.obo")


def test_default_hpo_file_reads():
    path = default_obo_path()
    assert path.name == "hp.obo"
    graph = read_obo(path)
    # HPO 2025-01-16 has 19,487 stanzas of which 450 are obsolete (counted with grep).
    assert 18_000 < graph.concepts.height < 20_000
    assert graph.definitions.height > 15_000
    assert graph.rejected.height == 0
    names = set(graph.concepts["preferred_name"].str.to_lowercase())
    assert "pleural effusion" in names


# --- UMLS RRF ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def umls_graph():
    return read_umls(FIXTURES / "umls")


def test_umls_preferred_name_and_synonyms(umls_graph):
    effusion = by_id(umls_graph.concepts, "C0032227")
    # The TS=P, STT=PF, ISPREF=Y row wins over the earlier non-preferred row.
    assert effusion["preferred_name"] == "Pleural effusion"
    # French and suppressed ("O") names are excluded.
    assert effusion["synonyms"] == ["Effusion, Pleural", "Pleural effusions"]
    assert effusion["semantic_types"] == ["T047"]


def test_umls_definitions_exclude_suppressed(umls_graph):
    definitions = umls_graph.definitions
    assert set(definitions.filter(pl.col("concept_id") == "C0032227")["definition"]) == {
        "Presence of fluid in the pleural cavity.",
        "Excess fluid between the pleural layers.",
    }
    assert "C0024109" not in set(definitions["concept_id"])


def test_umls_triplet_direction_and_filters(umls_graph):
    rows = set(umls_graph.triplets.select("head", "relation", "tail").iter_rows())
    # "CUI1 RO CUI2 RELA" means CUI2 has RELA to CUI1.
    assert rows == {
        ("Pleural effusion", "has finding site", "Lung"),
        ("Cardiomegaly", "has finding site", "Heart"),
    }


def test_umls_malformed_line_rejected(umls_graph):
    rejected = umls_graph.rejected
    assert rejected.height == 1
    row = rejected.row(0, named=True)
    assert row["reason"] == "wrong-field-count"
    assert row["location"] == "line 11"
    assert row["source_path"].endswith("MRCONSO.RRF")


def test_umls_source_vocabulary_filter():
    graph = read_umls(FIXTURES / "umls", sources=["SNOMEDCT_US"])
    assert by_id(graph.concepts, "C0032227")["preferred_name"] == "Pleural effusions"
    assert set(graph.definitions["definition"]) == {
        "Excess fluid between the pleural layers.",
        "The muscular organ that pumps blood.",
    }


def test_umls_semantic_type_filter():
    graph = read_umls(FIXTURES / "umls", semantic_types=["Disease or Syndrome"])
    assert set(graph.concepts["concept_id"]) == {"C0032227", "C0018800"}
    assert graph.triplets.height == 0


def test_umls_missing_file_error(tmp_path):
    shutil.copytree(FIXTURES / "umls", tmp_path / "META")
    (tmp_path / "META" / "MRREL.RRF").unlink()
    with pytest.raises(FileNotFoundError, match="MRREL.RRF"):
        read_umls(tmp_path / "META")


def test_rrf_blocks_match_whole_file(tmp_path):
    path = tmp_path / "MRREL.RRF"
    lines = [f"C{i:07d}|A|AUI|RO|C{i + 1:07d}|B|AUI|rel_{i % 3}|R{i}||SAB|SAB|||N||" for i in range(3000)]
    path.write_text("\n".join(lines) + "\n")
    whole = pl.concat(chunk.rows for chunk in iter_rrf(path, MRREL_COLUMNS, block_bytes=10_000_000))
    blocks = list(iter_rrf(path, MRREL_COLUMNS, block_bytes=4096))
    assert len(blocks) > 10
    pieces = pl.concat(chunk.rows for chunk in blocks)
    assert pieces.height == 3000
    assert pieces.equals(whole)
    assert pieces.row(2999, named=True)["RELA"] == "rel_2"  # 2999 % 3


def test_rrf_file_without_final_newline(tmp_path):
    path = tmp_path / "MRSTY.RRF"
    path.write_text("C1|T047|B|Disease or Syndrome|AT1||\nC2|T023|A|Body Part|AT2||")
    concepts = pl.concat(chunk.rows for chunk in iter_rrf(path, ("CUI", "TUI", "STN", "STY", "ATUI", "CVF")))
    assert concepts["CUI"].to_list() == ["C1", "C2"]


def test_rrf_invalid_utf8_error(tmp_path):
    path = tmp_path / "MRDEF.RRF"
    path.write_bytes(b"C1|A|AT||MSH|caf\xe9|N||\n")
    with pytest.raises(ValueError, match="must be UTF-8"):
        list(iter_rrf(path, ("CUI", "AUI", "ATUI", "SATUI", "SAB", "DEF", "SUPPRESS", "CVF")))


def test_mrrel_stream_memory_bounded(tmp_path):
    path = tmp_path / "MRREL.RRF"
    with path.open("w") as handle:
        for i in range(60_000):
            handle.write(f"C{i:07d}|A{i}|AUI|RO|C{(i * 7) % 60_000:07d}|B{i}|AUI|has_part|R{i}||SNOMEDCT_US|SNOMEDCT_US|||N||\n")
    size = path.stat().st_size
    tracemalloc.start()
    total = 0
    for chunk in iter_mrrel(path, block_bytes=256 * 1024):
        total += chunk.rows.height
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == 60_000 - 6  # rows with CUI1 == CUI2 (7i = i mod 60000: i = 0, 10000, ...) are dropped
    # Python-side allocations stay near one block, far below the file size.
    assert peak < size / 2, f"peak {peak} bytes for a {size}-byte file"


def test_mrconso_empty_file(tmp_path):
    path = tmp_path / "MRCONSO.RRF"
    path.write_text("")
    concepts, rejected = read_mrconso(path)
    assert concepts.height == 0
    assert rejected.height == 0


# --- KAD CSV -------------------------------------------------------------------------------


def test_kad_csv_reads_aligned_files():
    graph = read_kad_csv(FIXTURES / "kad" / "definitions.csv", FIXTURES / "kad" / "triplets.csv", FIXTURES / "kad" / "triplet_cuis.csv")
    assert graph.concepts.height == 5
    effusion = by_id(graph.concepts, "C0032227")
    assert effusion["preferred_name"] == "pleural effusion"
    assert effusion["synonyms"] == ["pleural effusions"]
    assert "C0018787" not in set(graph.definitions["concept_id"])  # empty DEF
    assert graph.definitions.height == 4
    rows = set(graph.triplets.select("head_id", "relation", "tail_id").iter_rows())
    assert ("C0032227", "associated with", "C0034063") in rows
    assert graph.triplets.height == 4
    assert graph.rejected["reason"].to_list() == ["missing-id-or-name"]
    assert graph.rejected["location"].to_list() == ["line 7"]


def test_kad_csv_row_count_mismatch():
    with pytest.raises(MisalignedFilesError, match="4 triplet rows but its concept-id file has 3"):
        read_kad_csv(FIXTURES / "kad" / "definitions.csv", FIXTURES / "kad" / "triplets.csv", FIXTURES / "kad" / "triplet_cuis_short.csv")


def test_kad_csv_shifted_rows():
    with pytest.raises(MisalignedFilesError, match="shifted by -1 rows"):
        read_kad_csv(FIXTURES / "kad" / "definitions.csv", FIXTURES / "kad" / "triplets.csv", FIXTURES / "kad" / "triplet_cuis_shifted.csv")


def test_kad_csv_missing_column(tmp_path):
    path = tmp_path / "definitions.csv"
    path.write_text("CUI,STR\nC1,name\n")
    with pytest.raises(ValueError, match=r"lacks columns \['NAME', 'DEF'\]"):
        read_kad_csv(path)


def test_kad_csv_needs_both_triplet_files():
    with pytest.raises(ValueError, match="give both"):
        read_kad_csv(FIXTURES / "kad" / "definitions.csv", FIXTURES / "kad" / "triplets.csv")


# --- restrictions and samples ---------------------------------------------------------------


def test_query_matching_accepts_stems(obo_graph):
    matches = match_query_concepts(obo_graph, ["pleural thicken", "pleural effusion", "lung", "consolidation"])
    assert matches["pleural thicken"] == ["TP:0000004"]
    assert matches["pleural effusion"] == ["TP:0000003"]
    assert matches["lung"] == []  # "Lung abnormality" has more words, not a longer last word
    assert matches["consolidation"] == []


@pytest.mark.parametrize(
    ("hops", "expected"),
    [
        (0, {"TP:0000003"}),
        (1, {"TP:0000003", "TP:0000002", "TP:0000005"}),
        (2, {"TP:0000003", "TP:0000002", "TP:0000005", "TP:0000001", "TP:0000004"}),
    ],
)
def test_hop_restriction(obo_graph, hops, expected):
    graph, report = restrict_graph(obo_graph, query_entities=["pleural effusion", "consolidation"], hops=hops)
    assert set(graph.concepts["concept_id"]) == expected
    assert report["unmatched_queries"] == ["consolidation"]
    kept = set(graph.concepts["concept_id"])
    assert set(graph.triplets["head_id"]) <= kept
    assert set(graph.triplets["tail_id"]) <= kept
    assert set(graph.definitions["concept_id"]) <= kept


def test_restriction_by_semantic_type_and_size(obo_graph):
    graph, report = restrict_graph(obo_graph, semantic_types=["test_phenotype"], max_concepts=2)
    assert report["after_semantic_types"] == 5
    assert graph.concepts["concept_id"].to_list() == ["TP:0000001", "TP:0000002"]
    assert graph.triplets.select("head_id", "tail_id").rows() == [("TP:0000002", "TP:0000001")]


def test_hop_restriction_without_match_errors(obo_graph):
    with pytest.raises(ValueError, match="no query entity matches"):
        restrict_graph(obo_graph, query_entities=["consolidation"], hops=1)


def test_stage1_samples(obo_graph):
    samples = build_stage1_samples(obo_graph.concepts, obo_graph.definitions, obo_graph.triplets)
    rows = set(samples.iter_rows())
    assert ("Pleural effusion", "Accumulation of fluid in the pleural space.", "TP:0000003", "definition") in rows
    assert ("Fluid in the chest", "Accumulation of fluid in the pleural space.", "TP:0000003", "definition") in rows
    assert ("Pleural effusion [SEP] part of", "Pleura", "TP:0000005", "head-relation") in rows
    assert ("part of [SEP] Pleura", "Pleural effusion", "TP:0000003", "relation-tail") in rows
    # 5 names with definitions plus 1 synonym each for TP:0000002 and TP:0000003; 4 triplets twice.
    assert samples.height == 7 + 8


def test_stage1_samples_exclude_held_out(obo_graph):
    samples = build_stage1_samples(obo_graph.concepts, obo_graph.definitions, obo_graph.triplets, excluded_ids={"TP:0000002"})
    text = " ".join(samples["text_a"].to_list() + samples["text_b"].to_list())
    assert "Abnormality of the lung" not in text
    assert "TP:0000002" not in set(samples["concept_id"])


def test_held_out_split_deterministic():
    ids = [f"HP:{i:07d}" for i in range(2000)]
    first = held_out_ids(ids, 0.1, seed=3)
    assert first == held_out_ids(list(reversed(ids)), 0.1, seed=3)
    assert first == held_out_ids(ids[:1000], 0.1, seed=3) | held_out_ids(ids[1000:], 0.1, seed=3)
    assert 140 < len(first) < 260
    assert first != held_out_ids(ids, 0.1, seed=4)
    with pytest.raises(ValueError, match="fraction"):
        held_out_ids(ids, 1.0)
