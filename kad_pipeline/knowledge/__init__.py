"""Knowledge-graph readers (OBO, UMLS RRF, KAD CSV), restrictions, and stage-1 samples."""

from kad_pipeline.knowledge.graph import KnowledgeGraph
from kad_pipeline.knowledge.kad_csv import MisalignedFilesError, read_kad_csv
from kad_pipeline.knowledge.obo import default_obo_path, read_obo
from kad_pipeline.knowledge.restrict import match_query_concepts, restrict_graph
from kad_pipeline.knowledge.samples import build_stage1_samples, held_out_ids
from kad_pipeline.knowledge.umls import iter_mrrel, read_umls

__all__ = [
    "KnowledgeGraph",
    "MisalignedFilesError",
    "build_stage1_samples",
    "default_obo_path",
    "held_out_ids",
    "iter_mrrel",
    "match_query_concepts",
    "read_kad_csv",
    "read_obo",
    "read_umls",
    "restrict_graph",
]
