"""RadGraph annotation source: a published JSON file or a run in RadGraph's own environment."""

from __future__ import annotations

import dagster as dg
from pydantic import Field


class RadGraphResource(dg.ConfigurableResource):
    """RadGraph settings. ``radgraph_json`` wins over ``python_executable``; with neither set, or
    with ``enabled`` false, the RadGraph extractor is off.
    """

    enabled: bool = Field(default=True, description="Switch the RadGraph extractor off without clearing paths.")
    radgraph_json: str | None = Field(
        default=None, description="Published RadGraph JSON (keyed by report id) to read instead of running the model."
    )
    python_executable: str | None = Field(
        default=None,
        description="Python of a separate environment with radgraph, transformers<5 and dagster-pipes.",
    )
    model_type: str = Field(default="radgraph-xl", description="radgraph model type, e.g. radgraph or radgraph-xl.")
    batch_size: int = Field(default=16, ge=1, description="Reports per model call.")

    @property
    def mode(self) -> str | None:
        """Return "json", "run", or None when the extractor is off."""
        if not self.enabled:
            return None
        if self.radgraph_json:
            return "json"
        if self.python_executable:
            return "run"
        return None
