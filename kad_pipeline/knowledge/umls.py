"""Streaming readers for UMLS Metathesaurus RRF files (MRCONSO, MRDEF, MRREL, MRSTY).

RRF files are pipe-delimited, unquoted, UTF-8, with a trailing `|` on every line. They are
read in blocks of whole lines (`block_bytes` each), so peak memory depends on the block size
and on the rows kept after filtering, not on the file size. Streaming a generated 5-million-row
MRREL peaked at about 350 MiB resident with 16 MiB blocks and about 1 GiB with 64 MiB blocks
(benchmarks/knowledge_reader_and_stage1.py, 2-core machine). Lines with the wrong number of
fields go to the rejected table with their line number.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from kad_pipeline.knowledge.graph import REJECTED_SCHEMA, KnowledgeGraph, empty_frame

logger = logging.getLogger(__name__)

# Column layouts from the UMLS Reference Manual, section 3.3 (Metathesaurus files).
MRCONSO_COLUMNS = ("CUI", "LAT", "TS", "LUI", "STT", "SUI", "ISPREF", "AUI", "SAUI", "SCUI", "SDUI", "SAB", "TTY", "CODE", "STR", "SRL", "SUPPRESS", "CVF")
MRDEF_COLUMNS = ("CUI", "AUI", "ATUI", "SATUI", "SAB", "DEF", "SUPPRESS", "CVF")
MRREL_COLUMNS = ("CUI1", "AUI1", "STYPE1", "REL", "CUI2", "AUI2", "STYPE2", "RELA", "RUI", "SRUI", "SAB", "SL", "RG", "DIR", "SUPPRESS", "CVF")
MRSTY_COLUMNS = ("CUI", "TUI", "STN", "STY", "ATUI", "CVF")

# SUPPRESS values: "N" is not suppressible; "O" obsolete, "E" suppressed by editors and
# "Y" suppressible by the source are all excluded by default.
UNSUPPRESSED = ("N", "")

DEFAULT_BLOCK_BYTES = 16 * 1024 * 1024


@dataclass
class RrfChunk:
    """One block of an RRF file: valid rows as a frame, bad lines as rejected rows."""

    rows: pl.DataFrame
    rejected: pl.DataFrame


def iter_rrf(
    path: str | os.PathLike,
    columns: tuple[str, ...],
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Iterator[RrfChunk]:
    """Yield an RRF file as frames of string columns, one block of whole lines at a time."""
    rrf_path = Path(path)
    if not rrf_path.is_file():
        raise FileNotFoundError(f"RRF file not found: {rrf_path}")
    if block_bytes < 1024:
        raise ValueError(f"block_bytes must be at least 1024, got {block_bytes}")
    expected_separators = len(columns)  # every field is followed by a "|"
    first_line = 1
    offset = 0
    carry = b""
    with rrf_path.open("rb") as handle:
        while True:
            block = handle.read(block_bytes)
            data = carry + block
            if not data:
                break
            if block:
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    continue
                data, carry = data[: cut + 1], data[cut + 1 :]
            else:
                carry = b""
            chunk, line_count = _parse_block(data, columns, expected_separators, first_line, rrf_path, offset)
            offset += len(data)
            first_line += line_count
            yield chunk
            if not block:
                break


def _parse_block(
    data: bytes, columns, expected_separators: int, first_line: int, rrf_path: Path, offset: int
) -> tuple[RrfChunk, int]:
    # One string column per line: NUL never occurs in RRF text, so no line is split, and
    # polars keeps blank lines (as nulls), which keeps the line numbers exact.
    try:
        frame = pl.read_csv(
            io.BytesIO(data),
            has_header=False,
            separator="\x00",
            quote_char=None,
            new_columns=["line"],
            infer_schema=False,
        )
    except pl.exceptions.ComputeError as error:
        raise ValueError(
            f"failed to read {rrf_path} in the block starting at byte {offset} ({error}): RRF files must be UTF-8 text"
        ) from error
    line_count = frame.height
    frame = frame.with_row_index("line_number", offset=first_line).filter(pl.col("line").str.len_bytes() > 0)
    source_path = str(rrf_path)
    counts = pl.col("line").str.count_matches("|", literal=True)
    good = frame.filter(counts == expected_separators)
    bad = frame.filter(counts != expected_separators)

    rows = (
        good.select(pl.col("line").str.split_exact("|", len(columns) - 1).struct.rename_fields(list(columns)))
        .unnest("line")
        .with_columns(pl.col(columns[-1]).str.strip_suffix("|"))
    )
    rejected = bad.select(
        pl.lit(source_path).alias("source_path"),
        pl.format("line {}", pl.col("line_number")).alias("location"),
        pl.lit("wrong-field-count").alias("reason"),
        pl.format("expected {} fields, found {}", pl.lit(len(columns)), counts).alias("detail"),
    ).cast(REJECTED_SCHEMA)
    return RrfChunk(rows=rows, rejected=rejected), line_count


def _collect(chunks: Iterable[RrfChunk], columns: tuple[str, ...], transform) -> tuple[pl.DataFrame, pl.DataFrame]:
    kept: list[pl.DataFrame] = []
    rejected: list[pl.DataFrame] = [empty_frame(REJECTED_SCHEMA)]
    for chunk in chunks:
        kept.append(transform(chunk.rows))
        if chunk.rejected.height:
            rejected.append(chunk.rejected)
    if not kept:
        kept.append(transform(pl.DataFrame(schema={name: pl.String for name in columns})))
    return pl.concat(kept), pl.concat(rejected)


def _in(column: str, values: Iterable[str] | None) -> pl.Expr:
    if values is None:
        return pl.lit(True)
    return pl.col(column).is_in(list(values))


def read_mrconso(
    path: str | os.PathLike,
    languages: Iterable[str] | None = ("ENG",),
    sources: Iterable[str] | None = None,
    include_suppressed: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read concept names from MRCONSO; return (concepts without semantic types, rejected).

    The preferred name of a CUI is its first kept row with TS=P, STT=PF and ISPREF=Y, else
    its first kept row. All other distinct strings of the CUI become synonyms.
    """

    def keep(rows: pl.DataFrame) -> pl.DataFrame:
        condition = _in("LAT", languages) & _in("SAB", sources)
        if not include_suppressed:
            condition = condition & pl.col("SUPPRESS").is_in(UNSUPPRESSED)
        return rows.filter(condition & (pl.col("STR").str.len_chars() > 0)).select(
            "CUI",
            "STR",
            ((pl.col("TS") == "P") & (pl.col("STT") == "PF") & (pl.col("ISPREF") == "Y")).alias("preferred"),
        )

    names, rejected = _collect(iter_rrf(path, MRCONSO_COLUMNS, block_bytes), MRCONSO_COLUMNS, keep)
    names = names.with_row_index("order")
    preferred = (
        names.sort(["CUI", "preferred", "order"], descending=[False, True, False])
        .group_by("CUI", maintain_order=True)
        .agg(pl.col("STR").first().alias("preferred_name"))
    )
    synonyms = (
        names.sort("order")
        .join(preferred, on="CUI")
        .filter(pl.col("STR") != pl.col("preferred_name"))
        .group_by("CUI", maintain_order=True)
        .agg(pl.col("STR").unique(maintain_order=True).alias("synonyms"))
    )
    concepts = (
        preferred.join(synonyms, on="CUI", how="left")
        .select(
            pl.col("CUI").alias("concept_id"),
            "preferred_name",
            pl.col("synonyms").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        )
        .sort("concept_id")
    )
    logger.info("MRCONSO %s: %d concepts, %d rejected lines", path, concepts.height, rejected.height)
    return concepts, rejected


def read_mrsty(path: str | os.PathLike, block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read MRSTY; return (concept_id, semantic_types: list of TUIs, semantic_type_names), rejected."""
    rows, rejected = _collect(iter_rrf(path, MRSTY_COLUMNS, block_bytes), MRSTY_COLUMNS, lambda frame: frame.select("CUI", "TUI", "STY"))
    types = rows.group_by("CUI", maintain_order=True).agg(
        pl.col("TUI").unique(maintain_order=True).alias("semantic_types"),
        pl.col("STY").unique(maintain_order=True).alias("semantic_type_names"),
    )
    return types.rename({"CUI": "concept_id"}), rejected


def read_mrdef(
    path: str | os.PathLike,
    sources: Iterable[str] | None = None,
    include_suppressed: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read MRDEF; return (concept_id, definition) with one row per distinct definition, and rejected."""

    def keep(rows: pl.DataFrame) -> pl.DataFrame:
        condition = _in("SAB", sources) & (pl.col("DEF").str.len_chars() > 0)
        if not include_suppressed:
            condition = condition & pl.col("SUPPRESS").is_in(UNSUPPRESSED)
        return rows.filter(condition).select(pl.col("CUI").alias("concept_id"), pl.col("DEF").alias("definition"))

    definitions, rejected = _collect(iter_rrf(path, MRDEF_COLUMNS, block_bytes), MRDEF_COLUMNS, keep)
    return definitions.unique(maintain_order=True), rejected


def iter_mrrel(
    path: str | os.PathLike,
    concept_ids: Iterable[str] | None = None,
    sources: Iterable[str] | None = None,
    require_rela: bool = True,
    include_suppressed: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Iterator[RrfChunk]:
    """Stream MRREL as (head_id, relation, tail_id) frames, one block at a time.

    MRREL row "CUI1 REL/RELA CUI2" states that CUI2 has relation RELA to CUI1 (UMLS
    Reference Manual, MRREL: "relationship of second concept to first concept"), so the
    triplet is head=CUI2, relation=RELA, tail=CUI1. Rows without RELA are skipped when
    `require_rela` is set, because REL codes alone (RB, RN, RO) give no readable relation.
    With `concept_ids`, only rows whose both ends are in that set are kept.
    """
    allowed = pl.Series(list(concept_ids), dtype=pl.String) if concept_ids is not None else None
    for chunk in iter_rrf(path, MRREL_COLUMNS, block_bytes):
        rows = chunk.rows
        condition = _in("SAB", sources) & (pl.col("CUI1") != pl.col("CUI2"))
        if require_rela:
            condition = condition & (pl.col("RELA").str.len_chars() > 0)
        if not include_suppressed:
            condition = condition & pl.col("SUPPRESS").is_in(UNSUPPRESSED)
        if allowed is not None:
            condition = condition & pl.col("CUI1").is_in(allowed) & pl.col("CUI2").is_in(allowed)
        relation = pl.when(pl.col("RELA").str.len_chars() > 0).then(pl.col("RELA")).otherwise(pl.col("REL"))
        triplets = rows.filter(condition).select(
            pl.col("CUI2").alias("head_id"),
            relation.str.replace_all("_", " ").alias("relation"),
            pl.col("CUI1").alias("tail_id"),
        )
        yield RrfChunk(rows=triplets, rejected=chunk.rejected)


def read_umls(
    directory: str | os.PathLike,
    languages: Iterable[str] | None = ("ENG",),
    sources: Iterable[str] | None = None,
    semantic_types: Iterable[str] | None = None,
    include_suppressed: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> KnowledgeGraph:
    """Read MRCONSO, MRSTY, MRDEF and MRREL from a UMLS `META` folder into a KnowledgeGraph.

    `sources` restricts names, definitions and relations to those source vocabularies (SAB);
    `semantic_types` keeps only concepts with at least one of those TUIs or type names.
    Relations are streamed and kept only between kept concepts.
    """
    folder = Path(directory)
    paths = {name: folder / f"{name}.RRF" for name in ("MRCONSO", "MRSTY", "MRDEF", "MRREL")}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"UMLS folder {folder} lacks {', '.join(missing)}: point it at the META folder")
    sources = list(sources) if sources is not None else None

    concepts, rejected_conso = read_mrconso(paths["MRCONSO"], languages, sources, include_suppressed, block_bytes)
    types, rejected_sty = read_mrsty(paths["MRSTY"], block_bytes)
    concepts = concepts.join(types, on="concept_id", how="left").with_columns(
        pl.col("semantic_types").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        pl.col("semantic_type_names").fill_null(pl.lit([], dtype=pl.List(pl.String))),
    )
    if semantic_types is not None:
        wanted = list(semantic_types)
        concepts = concepts.filter(
            pl.col("semantic_types").list.eval(pl.element().is_in(wanted)).list.any()
            | pl.col("semantic_type_names").list.eval(pl.element().is_in(wanted)).list.any()
        )
    concept_ids = concepts["concept_id"]

    definitions, rejected_def = read_mrdef(paths["MRDEF"], sources, include_suppressed, block_bytes)
    definitions = definitions.filter(pl.col("concept_id").is_in(concept_ids))

    triplet_parts = [pl.DataFrame(schema={"head_id": pl.String, "relation": pl.String, "tail_id": pl.String})]
    rejected_parts = []
    for chunk in iter_mrrel(paths["MRREL"], concept_ids, sources, True, include_suppressed, block_bytes):
        triplet_parts.append(chunk.rows)
        rejected_parts.append(chunk.rejected)
    names = concepts.select("concept_id", "preferred_name")
    triplets = (
        pl.concat(triplet_parts)
        .unique(maintain_order=True)
        .join(names.rename({"concept_id": "head_id", "preferred_name": "head"}), on="head_id")
        .join(names.rename({"concept_id": "tail_id", "preferred_name": "tail"}), on="tail_id")
    )
    rejected = pl.concat([rejected_conso, rejected_sty, rejected_def, *rejected_parts])
    graph = KnowledgeGraph(
        concepts=concepts, definitions=definitions, triplets=triplets, rejected=rejected, source=f"umls:{folder}"
    )
    logger.info("read UMLS %s: %s", folder, graph.summary())
    return graph
