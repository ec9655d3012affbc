"""Stage-1 training samples built from knowledge tables, and the held-out concept split."""

from __future__ import annotations

import hashlib

import polars as pl

SEP = " [SEP] "
SAMPLE_SCHEMA = {"text_a": pl.String, "text_b": pl.String, "concept_id": pl.String, "kind": pl.String}


def is_held_out(concept_id: str, fraction: float, seed: int = 0) -> bool:
    """Decide from a hash of (seed, concept_id) whether a concept belongs to the held-out split.

    The decision depends on nothing else, so it is the same on every machine and for every
    subset of the graph.
    """
    digest = hashlib.sha256(f"{seed}:{concept_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def held_out_ids(concept_ids: pl.Series | list[str], fraction: float, seed: int = 0) -> set[str]:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must lie in [0, 1), got {fraction}")
    return {concept_id for concept_id in concept_ids if is_held_out(concept_id, fraction, seed)}


def build_stage1_samples(
    concepts: pl.DataFrame,
    definitions: pl.DataFrame,
    triplets: pl.DataFrame,
    excluded_ids: set[str] | None = None,
    include_synonyms: bool = True,
) -> pl.DataFrame:
    """Build text pairs (text_a, text_b, concept_id, kind) for the stage-1 contrastive loss.

    Kinds of pairs, each labelled with the concept both texts describe:
    - "definition": (concept name, its definition), for the preferred name and, with
      `include_synonyms`, each synonym;
    - "head-relation": ("head [SEP] relation", tail name), labelled with the tail;
    - "relation-tail": ("relation [SEP] tail", head name), labelled with the head.
    Concepts in `excluded_ids` appear in no pair, not even as the other end of a triplet,
    so held-out retrieval measures generalization.
    """
    excluded = pl.Series(sorted(excluded_ids or ()), dtype=pl.String)
    concepts = concepts.filter(~pl.col("concept_id").is_in(excluded))
    definitions = definitions.filter(~pl.col("concept_id").is_in(excluded))
    triplets = triplets.filter(~pl.col("head_id").is_in(excluded) & ~pl.col("tail_id").is_in(excluded))

    names = concepts.select("concept_id", pl.col("preferred_name").alias("name"))
    if include_synonyms:
        synonyms = concepts.select("concept_id", pl.col("synonyms").alias("name")).explode("name").drop_nulls("name")
        names = pl.concat([names, synonyms])
    name_definition = names.join(definitions, on="concept_id", how="inner").select(
        pl.col("name").alias("text_a"),
        pl.col("definition").alias("text_b"),
        "concept_id",
        pl.lit("definition").alias("kind"),
    )
    head_relation = triplets.select(
        (pl.col("head") + SEP + pl.col("relation")).alias("text_a"),
        pl.col("tail").alias("text_b"),
        pl.col("tail_id").alias("concept_id"),
        pl.lit("head-relation").alias("kind"),
    )
    relation_tail = triplets.select(
        (pl.col("relation") + SEP + pl.col("tail")).alias("text_a"),
        pl.col("head").alias("text_b"),
        pl.col("head_id").alias("concept_id"),
        pl.lit("relation-tail").alias("kind"),
    )
    samples = pl.concat([name_definition, head_relation, relation_tail]).cast(SAMPLE_SCHEMA)
    return samples.filter((pl.col("text_a").str.len_chars() > 0) & (pl.col("text_b").str.len_chars() > 0))
