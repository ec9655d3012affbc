"""``kad demo``: materialize the whole asset graph on the embedded offline demo.

The run goes through a real Dagster instance (SQLite storage under ``DAGSTER_HOME``), so
``dagster dev`` opened on the same ``DAGSTER_HOME`` and ``KAD_ARTIFACTS_URI`` afterwards
shows every materialization, its metadata and its lineage.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# Run-level settings written to a new DAGSTER_HOME: library logs of the kad_pipeline package
# appear in the Dagster UI next to the asset logs, and no telemetry leaves the machine.
DAGSTER_YAML = """\
telemetry:
  enabled: false
python_logs:
  managed_python_loggers:
    - kad_pipeline
  python_log_level: INFO
"""

# Sizes of the demo run on a 2-core CPU: 128-pixel synthetic images and a ResNet-18
# backbone instead of the paper's ResNet-50 at 224 pixels, whose training step runs at
# about 8 images/s on such a CPU (benchmarks/train_throughput.py).
DEMO_RUN_CONFIG = {
    "ops": {
        "image_manifest": {"config": {"size": 128}},
        "image_cache": {"config": {"image_size": 128}},
        "kad_model": {
            "config": {
                "backbone": "resnet18",
                "image_size": 128,
                "epochs": 3,
                "global_batch_size": 32,
                "lr": 5e-4,
                "warmup_steps": 20,
                "crop_scale_min": 0.8,
                "checkpoint_every_steps": 100,
            }
        },
    }
}


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``kad demo``."""
    parser.add_argument(
        "--artifacts", default=None,
        help="folder or s3://bucket/prefix for every artifact (default: $KAD_ARTIFACTS_URI or ./.kad_artifacts)",
    )
    parser.add_argument(
        "--dagster-home", default=None,
        help="Dagster instance folder with its SQLite storage (default: $DAGSTER_HOME or ./.dagster_home)",
    )


def prepare_instance_home(dagster_home: str | None) -> Path:
    """Point ``DAGSTER_HOME`` at a folder with a ``dagster.yaml``, creating both if needed."""
    home = Path(dagster_home or os.environ.get("DAGSTER_HOME") or ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def run_demo(args: argparse.Namespace) -> int:
    """Run the offline demo end to end and print where the evaluation report is."""
    home = prepare_instance_home(args.dagster_home)
    artifacts = args.artifacts or os.environ.get("KAD_ARTIFACTS_URI") or str(Path(".kad_artifacts").resolve())
    os.environ["KAD_ARTIFACTS_URI"] = artifacts
    # Offline by construction: every model comes from an installed package.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from kad_pipeline.definitions import build_definitions, latest_metadata, materialize_all

    started = time.monotonic()
    defs = build_definitions(artifacts_uri=artifacts)
    print(f"Dagster instance: {home}\nArtifacts: {artifacts}", flush=True)
    try:
        materialize_all(defs, run_config=DEMO_RUN_CONFIG, log=lambda message: print(message, flush=True))
    except RuntimeError as error:
        print(f"Demo failed: {error}", flush=True)
        return 1

    minutes = (time.monotonic() - started) / 60
    print(f"Demo finished in {minutes:.1f} min.")
    metadata = latest_metadata("evaluation_report")
    for name in ("report_html", "report_markdown", "macro_auc"):
        if name in metadata:
            print(f"{name}: {metadata[name]}")
    print(
        "Open the Dagster UI on the same artifacts with:\n"
        f"  DAGSTER_HOME={home} KAD_ARTIFACTS_URI={artifacts} .venv/bin/dagster dev"
    )
    return 0
