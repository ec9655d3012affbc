"""The report source resource: the raw report collection the pipeline reads."""

from __future__ import annotations

import dagster as dg
from pydantic import Field


class ReportSourceResource(dg.ConfigurableResource):
    """The raw report collection: Open-i XML (tarball or folder), MIMIC-CXR (zip or tree), CSV or Parquet.

    Unset ``path`` means the 3,955 Open-i reports that the torchxrayvision package ships.
    """

    path: str | None = Field(default=None, description="Report file or folder; unset for the packaged Open-i reports.")

    def resolved_path(self) -> str:
        """Return the configured path, or the packaged Open-i tarball."""
        if self.path:
            return self.path
        from kad_pipeline.reports import openi_tarball_path

        return str(openi_tarball_path())
