"""Knowledge: the knowledge-graph tables, the stage-1 knowledge encoder, and its evaluation."""

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import polars as pl

from assets.metadata import markdown_image, markdown_table
from kad_pipeline.knowledge import build_stage1_samples, held_out_ids
from kad_pipeline.queries import KAD_QUERIES
from resources.knowledge import KnowledgeSourceResource
from resources.storage import ArtifactStorageResource
from resources.text_encoder import TextEncoderResource

GROUP = "knowledge"
TABLES_CODE_VERSION = "knowledge-tables-v1"
ENCODER_CODE_VERSION = "knowledge-encoder-v1"
EVAL_CODE_VERSION = "knowledge-encoder-eval-v1"


@dg.multi_asset(
    outs={
        "knowledge_concepts": dg.AssetOut(
            description="Concepts of the knowledge graph: concept_id, preferred_name, synonyms, semantic_types.",
            code_version=TABLES_CODE_VERSION,
            kinds={"polars", "parquet"},
        ),
        "knowledge_definitions": dg.AssetOut(
            description="Concept definitions: concept_id, definition (a concept may have several).",
            code_version=TABLES_CODE_VERSION,
            kinds={"polars", "parquet"},
        ),
        "knowledge_triplets": dg.AssetOut(
            description="Relations between concepts: head_id, head, relation, tail_id, tail.",
            code_version=TABLES_CODE_VERSION,
            kinds={"polars", "parquet"},
        ),
    },
    group_name=GROUP,
)
def knowledge_tables(context: dg.AssetExecutionContext, knowledge_source: KnowledgeSourceResource):
    """Read the configured knowledge graph (OBO, UMLS RRF or KAD CSV) and apply its restrictions."""
    context.log.info("Reading knowledge source of kind %s", knowledge_source.kind)
    graph, restriction = knowledge_source.load_graph()
    summary = graph.summary()
    rejected_by_reason = dict(graph.rejected.group_by("reason").len().sort("reason").rows()) if graph.rejected.height else {}
    context.log.info("Knowledge graph %s: %s; rejected by reason: %s", graph.source, summary, rejected_by_reason or "none")
    shared = {
        "source": graph.source,
        "restriction": dg.MetadataValue.json(restriction),
        "rejected_rows": graph.rejected.height,
        "rejected_by_reason": dg.MetadataValue.json(rejected_by_reason),
    }
    if graph.rejected.height:
        shared["rejected_sample"] = dg.MetadataValue.md(markdown_table(graph.rejected.head(20)))
    yield dg.Output(graph.concepts, output_name="knowledge_concepts", metadata={**shared, "rows": summary["concepts"]})
    yield dg.Output(graph.definitions, output_name="knowledge_definitions", metadata={**shared, "rows": summary["definitions"]})
    yield dg.Output(graph.triplets, output_name="knowledge_triplets", metadata={**shared, "rows": summary["triplets"]})


def _work_dir(config_document: dict, samples: pl.DataFrame) -> Path:
    """Return a local folder named by the training inputs, so a rerun after a crash resumes there."""
    fingerprint = json.dumps(config_document, sort_keys=True, default=str) + str(samples.hash_rows(seed=0).sum())
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "kad-stage1" / digest


@dg.asset(group_name=GROUP, code_version=ENCODER_CODE_VERSION, kinds={"pytorch", "polars", "parquet"})
def knowledge_encoder(
    context: dg.AssetExecutionContext,
    text_encoder: TextEncoderResource,
    storage: ArtifactStorageResource,
    knowledge_concepts: pl.DataFrame,
    knowledge_definitions: pl.DataFrame,
    knowledge_triplets: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """Stage 1: fine-tune the text encoder on name-definition and triplet pairs (multi-positive contrastive loss).

    A deterministic fraction of concepts is held out from training for `knowledge_encoder_eval`.
    The checkpoint folder (safetensors and config.json) goes to artifact storage, and the table
    is a one-row pointer: checkpoint_uri, base_model, steps, final_loss. A crashed run resumes
    from its last local checkpoint when it is materialized again with the same inputs and settings.
    """
    from kad_pipeline.training.stage1 import train_stage1

    config = text_encoder.stage1_config()
    held_out = held_out_ids(knowledge_concepts["concept_id"], text_encoder.held_out_fraction, text_encoder.seed)
    samples = build_stage1_samples(knowledge_concepts, knowledge_definitions, knowledge_triplets, excluded_ids=held_out)
    kinds = dict(samples.group_by("kind").len().sort("kind").rows())
    context.log.info("Stage-1 samples: %s; %d concepts held out", kinds, len(held_out))

    work_dir = _work_dir(asdict(config), samples)
    result = train_stage1(samples, config, work_dir)
    checkpoint_uri = storage.put_dir(result.checkpoint_dir, f"checkpoints/knowledge_encoder/{context.run_id}")
    context.log.info("Stage 1 finished: %d steps, loss %.4f, checkpoint %s", result.steps, result.final_loss, checkpoint_uri)
    shutil.rmtree(work_dir, ignore_errors=True)

    table = pl.DataFrame(
        {
            "checkpoint_uri": [checkpoint_uri],
            "base_model": [config.base_model],
            "steps": [result.steps],
            "final_loss": [result.final_loss],
        },
        schema={"checkpoint_uri": pl.String, "base_model": pl.String, "steps": pl.Int64, "final_loss": pl.Float64},
    )
    history = pl.DataFrame(result.history) if result.history else pl.DataFrame()
    return dg.Output(
        table,
        metadata={
            "checkpoint_uri": dg.MetadataValue.path(checkpoint_uri),
            "base_model": config.base_model,
            "steps": result.steps,
            "final_loss": float(result.final_loss),
            "samples": dg.MetadataValue.json(kinds),
            "held_out_concepts": len(held_out),
            "train_seconds": round(result.wall_seconds, 1),
            "pairs_per_second": round(result.pairs_per_second, 2),
            "loss_log": dg.MetadataValue.md(markdown_table(history, float_digits=4)) if history.height else "",
        },
    )


def _load_base_encoder(context: dg.AssetExecutionContext, trained, text_encoder: TextEncoderResource):
    """Build the untrained encoder that `trained` started from; return (encoder, model name).

    The checkpoint names the model it started from. When that model cannot be loaded here (a
    checkpoint from another machine), the configured base model is scored instead.
    """
    from kad_pipeline.models.text_encoder import build_knowledge_encoder

    def build(base_model: str):
        return build_knowledge_encoder(
            base_model,
            pooling=trained.config.pooling,
            max_length=trained.config.max_length,
            local_files_only=text_encoder.local_files_only,
        )

    try:
        return build(trained.config.base_model), trained.config.base_model
    except OSError as error:
        configured = text_encoder.resolved_base_model()
        if configured == trained.config.base_model:
            raise
        context.log.warning(
            "Failed to load the checkpoint's base model %s (%s); scoring the configured %s instead",
            trained.config.base_model, error, configured,
        )
        return build(configured), configured


@dg.asset(group_name=GROUP, code_version=EVAL_CODE_VERSION, kinds={"pytorch", "polars", "parquet"})
def knowledge_encoder_eval(
    context: dg.AssetExecutionContext,
    text_encoder: TextEncoderResource,
    storage: ArtifactStorageResource,
    knowledge_encoder: pl.DataFrame,
    knowledge_concepts: pl.DataFrame,
    knowledge_definitions: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """Held-out name-to-definition retrieval (top-1, top-5, MRR) of the base and the trained encoder.

    Queries are the preferred names of concepts held out from stage 1, candidates their
    definitions. The base encoder is scored on its normalized pooled output, because it has no
    trained projection. The metadata also shows a cosine-similarity heatmap of KAD's query
    entity names under both encoders, and the PNG is stored in artifact storage.
    """
    from kad_pipeline.knowledge.encoder_eval import (
        evaluate_name_to_definition,
        held_out_retrieval_set,
        similarity_heatmap_png,
    )
    from kad_pipeline.models.text_encoder import load_knowledge_encoder

    checkpoint_uri = knowledge_encoder["checkpoint_uri"][0]
    with tempfile.TemporaryDirectory(prefix="kad-stage1-eval-") as scratch:
        local = storage.get_dir(checkpoint_uri, Path(scratch) / "checkpoint")
        trained = load_knowledge_encoder(local)
    metadata = trained.config.metadata
    fraction = float(metadata.get("held_out_fraction", text_encoder.held_out_fraction))
    split_seed = int(metadata.get("split_seed", text_encoder.seed))
    base, base_model = _load_base_encoder(context, trained, text_encoder)

    held_out = held_out_ids(knowledge_concepts["concept_id"], fraction, split_seed)
    retrieval_set = held_out_retrieval_set(knowledge_concepts, knowledge_definitions, held_out, text_encoder.eval_max_concepts)
    if retrieval_set.height < 2:
        raise ValueError(
            f"only {retrieval_set.height} held-out concepts have a definition: raise held_out_fraction "
            "or use a knowledge source with more definitions"
        )
    context.log.info("Scoring name-to-definition retrieval on %d held-out concepts", retrieval_set.height)
    rows = []
    for label, encoder, project in (("base", base, False), ("trained", trained, True)):
        scores = evaluate_name_to_definition(encoder, retrieval_set, project=project)
        rows.append({"encoder": label, **scores})
        context.log.info("%s encoder: top1 %.3f top5 %.3f mrr %.3f", label, scores["top1"], scores["top5"], scores["mrr"])
    table = pl.DataFrame(rows).select("encoder", "top1", "top5", "mrr", pl.col("queries").cast(pl.Int64))

    names = list(KAD_QUERIES)
    matrices = {}
    for label, encoder, project in (("base encoder", base, False), ("trained encoder", trained, True)):
        embeddings = encoder.encode(names, project=project)
        matrices[label] = embeddings @ embeddings.T
    png = similarity_heatmap_png(names, matrices, title="Cosine similarity of KAD query entities")
    heatmap_uri = storage.put_bytes(f"reports/knowledge_encoder_eval/{context.run_id}/query_similarity.png", png)

    by_encoder = {row["encoder"]: row for row in rows}
    return dg.Output(
        table,
        metadata={
            "retrieval": dg.MetadataValue.md(markdown_table(table)),
            "base_top1": by_encoder["base"]["top1"],
            "trained_top1": by_encoder["trained"]["top1"],
            "held_out_queries": retrieval_set.height,
            "base_model": base_model,
            "checkpoint_uri": dg.MetadataValue.path(checkpoint_uri),
            "heatmap_uri": dg.MetadataValue.path(heatmap_uri),
            "query_similarity": dg.MetadataValue.md(markdown_image(png, "query entity similarity, base and trained")),
        },
    )
