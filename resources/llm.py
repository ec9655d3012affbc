"""The LLM extractor's endpoint and request settings."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from kad_pipeline.extraction.llm import LLMConfig


class LLMExtractorResource(dg.ConfigurableResource):
    """An OpenAI-compatible chat endpoint (self-hosted, Azure OpenAI or another approved service).

    The extractor is off while ``base_url`` is unset. The API key is read at run time from the
    environment variable named by ``api_key_env`` and is never stored in the configuration.
    """

    base_url: str | None = Field(
        default=None,
        description="Endpoint URL, e.g. http://llm.hospital.internal/v1; for Azure the resource endpoint. "
        "Unset disables the LLM extractor.",
    )
    model: str | None = Field(default=None, description="Model name; for Azure OpenAI the deployment name.")
    api_key_env: str = Field(
        default="OPENAI_API_KEY", description="Name of the environment variable that contains the API key."
    )
    azure: bool = Field(default=False, description="Use Azure OpenAI (api-key header, deployment URLs).")
    azure_api_version: str = Field(default="2024-10-21", description="Azure OpenAI REST API version.")
    cache_dir: str = Field(
        default=".kad_cache/llm",
        description="Folder of the response cache. Cached responses quote reports, so keep it with the patient data.",
    )
    concurrency: int = Field(default=4, ge=1, description="Requests in flight at once.")
    requests_per_minute: float | None = Field(
        default=60.0, gt=0, description="Request starts per minute, retries included; unset for no limit."
    )
    allow_public_endpoint: bool = Field(
        default=False,
        description="Allow the public OpenAI API. Never for MIMIC-CXR: its data use agreement forbids it.",
    )
    timeout: float = Field(default=60.0, gt=0, description="Seconds per request.")
    max_retries: int = Field(default=5, ge=0, description="Retries on 429, 5xx, timeouts and connection errors.")
    prompt_price_per_million: float | None = Field(
        default=None, ge=0, description="USD per million prompt tokens, for the cost estimate."
    )
    completion_price_per_million: float | None = Field(
        default=None, ge=0, description="USD per million completion tokens, for the cost estimate."
    )

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)

    def config(self) -> LLMConfig:
        """Return the library settings; raises ValueError while ``base_url`` is unset."""
        if not self.base_url:
            raise ValueError("LLMExtractorResource.base_url is not set, so the LLM extractor is disabled")
        if not self.model:
            raise ValueError("LLMExtractorResource.model is not set: give the model or Azure deployment name")
        return LLMConfig(
            base_url=self.base_url,
            model=self.model,
            api_key_env=self.api_key_env,
            azure=self.azure,
            azure_api_version=self.azure_api_version,
            cache_dir=self.cache_dir,
            concurrency=self.concurrency,
            requests_per_minute=self.requests_per_minute,
            allow_public_endpoint=self.allow_public_endpoint,
            timeout=self.timeout,
            max_retries=self.max_retries,
            prompt_price_per_million=self.prompt_price_per_million,
            completion_price_per_million=self.completion_price_per_million,
        )
