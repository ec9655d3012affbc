"""KAD model: token shapes, scoring, losses, checkpoint round trip and released-checkpoint loading."""

from __future__ import annotations

import math

import pytest
import torch

from kad_pipeline.models.checkpoints import (
    load_query_embeddings,
    load_released_kad_checkpoint,
    save_kad_checkpoint,
)
from kad_pipeline.models.kad import (
    KADConfig,
    KADModel,
    dqn_classification_loss,
    image_text_contrastive_loss,
    load_kad_model,
)

SMALL = {"backbone": "resnet18", "image_size": 64, "embed_dim": 32, "num_heads": 4, "ff_dim": 64}


def small_model(seed: int = 0, **overrides) -> KADModel:
    torch.manual_seed(seed)
    return KADModel(KADConfig(**{**SMALL, "query_names": ["a", "b", "c"], **overrides})).eval()


def test_resnet50_layer3_tokens_at_224():
    torch.manual_seed(0)
    model = KADModel(KADConfig(backbone="resnet50", image_size=224)).eval()
    assert model.config.resnet_cut == "layer3"
    assert model.image_encoder.feature_channels == 1024
    assert model.image_encoder.res_l1.weight.shape == (1024, 1024)
    assert model.image_encoder.res_l2.weight.shape == (768, 1024)
    with torch.no_grad():
        tokens, pooled, grid = model.encode_image(torch.randn(1, 3, 224, 224))
    assert grid == (14, 14)
    assert tokens.shape == (1, 196, 768)
    torch.testing.assert_close(pooled, tokens.mean(dim=1))


def test_resnet50_layer4_from_512():
    model = KADModel(KADConfig(backbone="resnet50", image_size=512, embed_dim=64))
    assert model.config.resnet_cut == "layer4"
    assert model.image_encoder.feature_channels == 2048
    with torch.no_grad():
        tokens, _, grid = model.eval().encode_image(torch.randn(1, 3, 512, 512))
    assert grid == (16, 16)
    assert tokens.shape == (1, 256, 64)


def test_vit_b16_tokens():
    model = KADModel(KADConfig(backbone="vit_b_16", image_size=224, embed_dim=48)).eval()
    with torch.no_grad():
        tokens, _, grid = model.encode_image(torch.randn(1, 3, 224, 224))
    assert grid == (14, 14)
    assert tokens.shape == (1, 196, 48)


def test_dqn_structure_matches_paper():
    dqn = KADModel(KADConfig(backbone="resnet18", image_size=64)).dqn
    assert len(dqn.layers) == 4
    assert dqn.layers[0].self_attn.num_heads == 4
    assert dqn.layers[0].linear1.weight.shape == (1024, 768)
    assert dqn.layers[0].multihead_attn.dropout == pytest.approx(0.1)
    assert dqn.mlp_head[0].weight.shape == (2, 768)
    assert not any("pos" in name for name, _ in dqn.named_parameters())


def test_score_returns_softmax_and_attention():
    model = small_model()
    images = torch.randn(2, 1, 64, 64)
    queries = torch.randn(5, 32)
    probs, attention = model.score(images, queries)
    assert probs.shape == (2, 5)
    assert attention.shape == (2, 5, 4, 4)  # 64 px / stride 16

    with torch.no_grad():
        logits, _, _ = model(images, queries)
    expected = torch.exp(logits[..., 1]) / torch.exp(logits).sum(-1)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(attention.sum(dim=(-1, -2)), torch.ones(2, 5))

    _, mean_attention = model.score(images, queries, layer="mean")
    assert not torch.allclose(mean_attention, attention)
    torch.testing.assert_close(mean_attention.sum(dim=(-1, -2)), torch.ones(2, 5))
    with pytest.raises(ValueError, match="invalid attention layer"):
        model.score(images, queries, layer="first")


def test_gray_input_equals_replicated_rgb():
    model = small_model()
    gray = torch.rand(2, 1, 64, 64)
    queries = torch.randn(3, 32)
    probs_gray, _ = model.score(model.normalize(gray), queries)
    probs_rgb, _ = model.score(model.normalize(gray.repeat(1, 3, 1, 1)), queries)
    torch.testing.assert_close(probs_gray, probs_rgb)


def test_classification_loss_by_hand():
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]])  # (1, 2, 2)
    labels = torch.tensor([[1, -1]])
    loss_pos = -math.log(math.exp(1) / (1 + math.exp(1)))
    loss_neg_for_uncertain = -math.log(math.exp(2) / (math.exp(2) + 1))
    negative = dqn_classification_loss(logits, labels, "negative")
    assert negative.item() == pytest.approx((loss_pos + loss_neg_for_uncertain) / 2, rel=1e-6)
    ignore = dqn_classification_loss(logits, labels, "ignore")
    assert ignore.item() == pytest.approx(loss_pos, rel=1e-6)


def test_contrastive_loss_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    ids = torch.tensor([0, 1, 0])  # rows 0 and 2 share an entity text
    temperature = 0.5
    # Row 0: logits (2, 0, 2), targets (0.5, 0, 0.5). Row 1: logits (0, 2, 0), target one-hot.
    log_z0 = math.log(2 * math.exp(2) + 1)
    row0 = -(0.5 * (2 - log_z0) + 0.5 * (2 - log_z0))
    row1 = -(2 - math.log(math.exp(2) + 2))
    expected = (row0 + row1 + row0) / 3  # the logits matrix is symmetric, so both directions agree
    loss = image_text_contrastive_loss(image, text, ids, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_save_and_reload_give_identical_scores(tmp_path):
    model = small_model(uncertain_policy="ignore")
    queries = torch.randn(3, 32)
    save_kad_checkpoint(model, tmp_path / "ckpt", query_embeddings=queries, training={"epochs": 1})
    reloaded = load_kad_model(tmp_path / "ckpt")
    assert reloaded.config == model.config
    assert reloaded.config.uncertain_policy == "ignore"
    images = torch.randn(3, 3, 64, 64)
    probs, attention = model.score(images, queries)
    probs_again, attention_again = reloaded.score(images, queries)
    assert torch.equal(probs, probs_again)
    assert torch.equal(attention, attention_again)
    assert torch.equal(load_query_embeddings(tmp_path / "ckpt"), queries)


def _released_layout(model: KADModel) -> dict:
    """Re-key our weights the way the KAD reference code saves them (DataParallel prefixes included)."""
    image_encoder = {f"module.{key}": value for key, value in model.image_encoder.state_dict().items()}
    dqn = {}
    for key, value in model.dqn.state_dict().items():
        if key.startswith("layers."):
            dqn[f"module.decoder.{key}"] = value
        else:
            dqn[f"module.{key}"] = value
            if key.startswith("decoder_norm."):
                dqn[f"module.decoder.norm.{key.split('.')[-1]}"] = value
    text_encoder = {"module.embeddings.position_ids": torch.arange(512).unsqueeze(0),
                    "module.embeddings.word_embeddings.weight": torch.randn(10, 32)}
    return {"model": dqn, "image_encoder": image_encoder, "text_encoder": text_encoder}


def test_released_checkpoint_loads(tmp_path):
    source = small_model(seed=3)
    torch.save(_released_layout(source), tmp_path / "kad.pt")

    loaded, text_state = load_released_kad_checkpoint(tmp_path / "kad.pt", KADConfig(**SMALL))
    assert "embeddings.position_ids" not in text_state
    assert "embeddings.word_embeddings.weight" in text_state

    images, queries = torch.randn(2, 3, 64, 64), torch.randn(4, 32)
    probs, attention = source.score(images, queries)
    loaded_probs, loaded_attention = loaded.score(images, queries)
    assert torch.equal(probs, loaded_probs)
    assert torch.equal(attention, loaded_attention)


def test_released_checkpoint_mismatch_raises(tmp_path):
    layout = _released_layout(small_model())
    del layout["image_encoder"]["module.res_l2.weight"]
    torch.save(layout, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="lack 1 keys"):
        load_released_kad_checkpoint(tmp_path / "broken.pt", KADConfig(**SMALL))

    torch.save(_released_layout(small_model()), tmp_path / "kad.pt")
    with pytest.raises(ValueError, match="has shape"):
        load_released_kad_checkpoint(tmp_path / "kad.pt", KADConfig(**{**SMALL, "embed_dim": 64, "num_heads": 4}))

    torch.save({"state_dict": {}}, tmp_path / "stage1.pt")
    with pytest.raises(ValueError, match="not a KAD stage-2 checkpoint"):
        load_released_kad_checkpoint(tmp_path / "stage1.pt", KADConfig(**SMALL))
