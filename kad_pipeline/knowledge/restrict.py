"""Restrictions of a KnowledgeGraph: by semantic type, by query-entity neighbourhood, by size."""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterable

import polars as pl

from kad_pipeline.knowledge.graph import KnowledgeGraph

logger = logging.getLogger(__name__)


def normalize_name(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def match_query_concepts(graph: KnowledgeGraph, queries: Iterable[str]) -> dict[str, list[str]]:
    """Map each query entity to the concept ids whose name or synonym matches it.

    A name matches when, after lowercasing and keeping only letters and digits, it equals
    the query, or equals it with more letters on the last word. The second rule lets the
    stemmed KAD queries ("pleural thicken", "hyperinflate") reach "pleural thickening".
    """
    patterns = {query: re.compile(rf"^{re.escape(normalize_name(query))}[a-z]*$") for query in queries}
    matches: dict[str, list[str]] = {query: [] for query in patterns}
    for concept_id, name, synonyms in graph.concepts.select("concept_id", "preferred_name", "synonyms").iter_rows():
        candidates = [normalize_name(name), *(normalize_name(s) for s in synonyms or [])]
        for query, pattern in patterns.items():
            if any(pattern.match(candidate) for candidate in candidates):
                matches[query].append(concept_id)
    return matches


def neighbourhood(triplets: pl.DataFrame, seeds: Iterable[str], hops: int) -> set[str]:
    """Return the concept ids within `hops` relation steps of `seeds`, in either direction."""
    if hops < 0:
        raise ValueError(f"hops must be >= 0, got {hops}")
    adjacency: dict[str, list[str]] = {}
    for head_id, tail_id in triplets.select("head_id", "tail_id").iter_rows():
        adjacency.setdefault(head_id, []).append(tail_id)
        adjacency.setdefault(tail_id, []).append(head_id)
    distance = {seed: 0 for seed in seeds}
    queue = deque(distance)
    while queue:
        node = queue.popleft()
        if distance[node] == hops:
            continue
        for neighbour in adjacency.get(node, ()):
            if neighbour not in distance:
                distance[neighbour] = distance[node] + 1
                queue.append(neighbour)
    return set(distance)


def keep_concepts(graph: KnowledgeGraph, concept_ids: Iterable[str] | pl.Series) -> KnowledgeGraph:
    """Return the subgraph on `concept_ids`: their concepts, definitions, and triplets between them."""
    ids = pl.Series(list(concept_ids), dtype=pl.String)
    return KnowledgeGraph(
        concepts=graph.concepts.filter(pl.col("concept_id").is_in(ids)),
        definitions=graph.definitions.filter(pl.col("concept_id").is_in(ids)),
        triplets=graph.triplets.filter(pl.col("head_id").is_in(ids) & pl.col("tail_id").is_in(ids)),
        rejected=graph.rejected,
        source=graph.source,
    )


def restrict_graph(
    graph: KnowledgeGraph,
    semantic_types: Iterable[str] | None = None,
    query_entities: Iterable[str] | None = None,
    hops: int | None = None,
    max_concepts: int | None = None,
) -> tuple[KnowledgeGraph, dict[str, object]]:
    """Apply the optional restrictions in order: semantic types, query neighbourhood, size cap.

    Returns the restricted graph and a report (counts after each step, the queries that
    matched no concept) for asset metadata. With `hops` set, `query_entities` name the
    seeds; concepts farther than `hops` relations from every seed are dropped. `max_concepts`
    keeps the first concepts by concept_id, so the result does not depend on input order.
    Source vocabularies are a reader option (UMLS SAB), because only the RRF files carry them.
    """
    report: dict[str, object] = {"concepts_in": graph.concepts.height}
    restricted = graph
    if semantic_types:
        wanted = list(semantic_types)
        kept = restricted.concepts.filter(pl.col("semantic_types").list.eval(pl.element().is_in(wanted)).list.any())
        restricted = keep_concepts(restricted, kept["concept_id"])
        report["after_semantic_types"] = restricted.concepts.height

    if hops is not None:
        if not query_entities:
            raise ValueError("a hop restriction needs query entities to start from")
        matches = match_query_concepts(restricted, query_entities)
        unmatched = sorted(query for query, ids in matches.items() if not ids)
        seeds = {concept_id for ids in matches.values() for concept_id in ids}
        if not seeds:
            raise ValueError("no query entity matches any concept name, so the hop restriction would keep nothing")
        if unmatched:
            logger.info("%d query entities match no concept: %s", len(unmatched), ", ".join(unmatched))
        restricted = keep_concepts(restricted, neighbourhood(restricted.triplets, seeds, hops))
        report["query_seeds"] = len(seeds)
        report["unmatched_queries"] = unmatched
        report["after_hops"] = restricted.concepts.height

    if max_concepts is not None and restricted.concepts.height > max_concepts:
        if max_concepts < 1:
            raise ValueError(f"max_concepts must be >= 1, got {max_concepts}")
        kept_ids = restricted.concepts["concept_id"].sort().head(max_concepts)
        restricted = keep_concepts(restricted, kept_ids)
        report["after_max_concepts"] = restricted.concepts.height

    report["concepts_out"] = restricted.concepts.height
    return restricted, report
