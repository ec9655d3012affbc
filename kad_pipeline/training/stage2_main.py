"""Entrypoint of a stage-2 training process: ``python -m kad_pipeline.training.stage2_main --config config.json``.

Run it directly, under ``torchrun`` for DDP, or as a Dagster Pipes child process. When the
Pipes context variable is set, rank 0 streams log lines and a final summary (losses,
throughput, checkpoint path) to Dagster. Otherwise everything goes to standard logging.
The summary is also written to ``<output_dir>/summary.json``. Any failure exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kad_pipeline.training.distributed import cleanup_distributed, init_distributed
from kad_pipeline.training.stage2 import Stage2Config, train_stage2

logger = logging.getLogger("kad_pipeline.training.stage2_main")


def _pipes_reporter(pipes: Any):
    def report(event: str, payload: dict[str, Any]) -> None:
        if event == "step":
            pipes.log.info(
                f"step {payload['step']} loss {payload['loss']:.4f} (image {payload['loss_image']:.4f}, "
                f"text {payload['loss_text']:.4f}, contrastive {payload['loss_contrastive']:.4f}) "
                f"{payload.get('images_per_second', 0.0):.1f} images/s"
            )
        elif event == "final":
            pipes.report_custom_message({"event": "final", **payload})
        else:
            pipes.log.info(f"{event}: {json.dumps(payload, default=str)}")

    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train KAD stage 2 (image encoder and Disease Query Network).")
    parser.add_argument("--config", required=True, help="path of the stage-2 JSON config (Stage2Config fields)")
    args = parser.parse_args(argv)

    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    config = Stage2Config.from_json(args.config)
    context = init_distributed(config.device)
    try:
        from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

        if context.is_main and os.environ.get(DAGSTER_PIPES_CONTEXT_ENV_VAR):
            with open_dagster_pipes() as pipes:
                pipes.log.info(f"stage 2 starting, world size {context.world_size}, device {context.device}")
                summary = train_stage2(config, context, report=_pipes_reporter(pipes))
        else:
            summary = train_stage2(config, context)
        if context.is_main:
            Path(config.output_dir, "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    finally:
        cleanup_distributed(context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
