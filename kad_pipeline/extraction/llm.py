"""LLM extractor: an OpenAI-compatible chat model labels the query findings each report mentions.

It uses the official ``openai`` client against a configurable endpoint (a self-hosted server,
Azure OpenAI, or another approved service), structured output through a JSON schema, a
persistent answer cache, bounded concurrency with a rate limit, and retries with exponential
backoff. Reports that still fail are returned in a failures table with the reason.
"""

from __future__ import annotations

import bisect
import email.utils
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import openai
import polars as pl

from kad_pipeline.extraction.llm_cache import AnswerCache, RateLimiter, cache_key
from kad_pipeline.extraction.llm_prompt import (
    CATEGORY_BY_STATUS,
    PROMPT_VERSION,
    AnswerFormatError,
    ParsedAnswer,
    build_messages,
    parse_answer,
    response_format,
)
from kad_pipeline.extraction.radgraph import ENTITY_SCHEMA, sentence_starts
from kad_pipeline.queries import KAD_QUERIES

logger = logging.getLogger(__name__)

EXTRACTOR_NAME = "llm"

# Hosts of the public OpenAI API. Azure OpenAI (*.openai.azure.com) is a different service,
# run under the customer's own agreement with Microsoft, so it is not on this list.
PUBLIC_OPENAI_HOSTS = ("api.openai.com", "openai.com", "chatgpt.com")

FAILURE_SCHEMA: dict[str, pl.DataType] = {"report_id": pl.String(), "reason": pl.String(), "detail": pl.String()}
REJECTED_SCHEMA: dict[str, pl.DataType] = {
    "report_id": pl.String(),
    "name": pl.String(),
    "status": pl.String(),
    "reason": pl.String(),
    "detail": pl.String(),
}


class PublicEndpointError(ValueError):
    """The configured endpoint is the public OpenAI API and the allow flag is not set."""


@dataclass
class LLMConfig:
    """Settings of the LLM extractor."""

    base_url: str  # OpenAI-compatible endpoint, e.g. http://llm.hospital.internal/v1; for Azure the resource endpoint
    model: str  # model name; for Azure OpenAI the deployment name
    api_key_env: str = "OPENAI_API_KEY"  # environment variable that contains the API key; "" for none
    azure: bool = False  # use openai.AzureOpenAI (api-key header, deployment URLs)
    azure_api_version: str = "2024-10-21"  # Azure OpenAI REST API version
    cache_dir: str = ".kad_cache/llm"  # folder of the response cache
    concurrency: int = 4  # requests in flight at once
    requests_per_minute: float | None = 60.0  # request starts per minute, retries included; None for no limit
    allow_public_endpoint: bool = False  # allow api.openai.com (never for MIMIC-CXR data)
    timeout: float = 60.0  # seconds per request
    max_retries: int = 5  # retries after the first attempt, on 429, 5xx, timeouts and connection errors
    backoff_base: float = 1.0  # seconds; the n-th retry waits about backoff_base * 2**n
    backoff_max: float = 60.0  # seconds; cap of one backoff wait
    max_retry_after: float = 300.0  # seconds; a longer Retry-After fails the report instead of waiting
    temperature: float = 0.0
    max_completion_tokens: int = 1024
    prompt_price_per_million: float | None = None  # USD per million prompt tokens, for the cost estimate
    completion_price_per_million: float | None = None  # USD per million completion tokens

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {self.max_retries}")
        if not self.model:
            raise ValueError("model is required: the model name, or the deployment name for Azure OpenAI")


def check_endpoint(base_url: str | None, allow_public_endpoint: bool = False) -> str:
    """Validate the endpoint URL and reject the public OpenAI API unless explicitly allowed."""
    if not base_url:
        # The openai client would fall back to the public API (or $OPENAI_BASE_URL); we never do.
        raise ValueError("base_url is required: the URL of an approved OpenAI-compatible endpoint")
    parsed = urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"base_url must be an http(s) URL with a host, got {base_url!r}")
    host = parsed.hostname.lower()
    is_public = any(host == public or host.endswith("." + public) for public in PUBLIC_OPENAI_HOSTS)
    if is_public and not allow_public_endpoint:
        raise PublicEndpointError(
            f"refusing to send reports to the public OpenAI API at {base_url}. The MIMIC-CXR data use "
            "agreement (PhysioNet Credentialed Health Data Use Agreement) forbids sharing the data with "
            "third parties, and PhysioNet states that this includes sending it to online services such "
            "as the ChatGPT/OpenAI API. Use a self-hosted OpenAI-compatible server or an approved "
            "deployment such as Azure OpenAI under your institution's agreement. Set "
            "allow_public_endpoint (--allow-public-endpoint) only for reports that no such agreement "
            "covers, such as the public Open-i collection."
        )
    return base_url


@dataclass
class LLMUsage:
    """Counts of one extraction run; cost is an estimate from the configured prices, else None."""

    requests: int = 0  # HTTP requests sent, retries included
    answered: int = 0  # texts answered by the server in this run
    cache_hits: int = 0  # texts answered from the cache
    failed: int = 0  # reports without a usable answer
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_cost_usd: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LLMResult:
    """Entity table, failed reports with reasons, rejected answer items, and usage of one run."""

    entities: pl.DataFrame
    failures: pl.DataFrame
    rejected_findings: pl.DataFrame
    usage: LLMUsage = field(default_factory=LLMUsage)


class RequestFailedError(Exception):
    """A request that gave no usable answer after all retries; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def retry_after_seconds(headers: Any) -> float | None:
    """Read ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date); None when absent or invalid."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def backoff_seconds(attempt: int, base: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: uniform between half and all of ``min(maximum, base * 2**attempt)``."""
    ceiling = min(maximum, base * (2**attempt))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class LLMExtractor:
    """Entity extraction with an OpenAI-compatible chat model; see :class:`LLMConfig` for settings."""

    name = EXTRACTOR_NAME

    def __init__(self, config: LLMConfig, queries: Sequence[str] = KAD_QUERIES, client: Any | None = None) -> None:
        check_endpoint(config.base_url, config.allow_public_endpoint)
        self.config = config
        self.queries = tuple(queries)
        self.version = f"llm:{config.model}:{PROMPT_VERSION}"
        self.cache = AnswerCache(config.cache_dir)
        self._client = client
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._abort = threading.Event()
        self._abort_reason = ""

    # ----------------------------------------------------------------------------------------
    # Client and one request
    # ----------------------------------------------------------------------------------------

    def client(self):
        """Return the ``openai`` client; created on first use, so the API key is read at run time."""
        if self._client is None:
            api_key = os.environ.get(self.config.api_key_env) if self.config.api_key_env else None
            if not api_key:
                # Self-hosted servers often need no key, but the openai client requires a value.
                if self.config.api_key_env:
                    logger.warning(
                        "environment variable %s is not set; sending requests without an API key",
                        self.config.api_key_env,
                    )
                api_key = "no-key"
            if self.config.azure:
                self._client = openai.AzureOpenAI(
                    azure_endpoint=self.config.base_url,
                    azure_deployment=self.config.model,
                    api_version=self.config.azure_api_version,
                    api_key=api_key,
                    timeout=self.config.timeout,
                    max_retries=0,  # retries are ours, to count them and honor Retry-After with jitter
                )
            else:
                self._client = openai.OpenAI(
                    base_url=self.config.base_url, api_key=api_key, timeout=self.config.timeout, max_retries=0
                )
        return self._client

    def _request(self, report_id: str, text: str, limiter: RateLimiter, usage: LLMUsage) -> dict[str, Any]:
        """Ask for one text's findings, retrying transient errors; return the cache entry."""
        config = self.config
        last_reason, last_detail = "", ""
        attempts = 0
        for attempt in range(config.max_retries + 1):
            if self._abort.is_set():
                raise RequestFailedError("aborted", self._abort_reason)
            limiter.acquire()
            with self._lock:
                usage.requests += 1
            attempts += 1
            retry_after = None
            try:
                response = self.client().chat.completions.create(
                    model=config.model,
                    messages=build_messages(text, self.queries),
                    response_format=response_format(self.queries),
                    temperature=config.temperature,
                    max_completion_tokens=config.max_completion_tokens,
                    timeout=config.timeout,
                )
            except openai.APITimeoutError:
                last_reason, last_detail = "timeout", f"no response within {config.timeout} s"
            except openai.APIConnectionError as error:
                last_reason, last_detail = "connection-error", str(error.__cause__ or error)[:200]
            except openai.APIStatusError as error:
                status = error.status_code
                last_reason, last_detail = f"http-{status}", _status_detail(error)
                if status in (401, 403):
                    self._abort_reason = (
                        f"HTTP {status} from {config.base_url}: check that ${config.api_key_env} contains a valid "
                        "key for this endpoint"
                    )
                    self._abort.set()
                    raise RequestFailedError(last_reason, self._abort_reason) from error
                if status != 429 and status != 408 and status < 500:
                    raise RequestFailedError(last_reason, last_detail) from error
                retry_after = retry_after_seconds(error.response.headers)
            else:
                entry = self._entry_from_response(response)
                with self._lock:
                    usage.answered += 1
                    usage.prompt_tokens += entry["prompt_tokens"]
                    usage.completion_tokens += entry["completion_tokens"]
                return entry

            if attempt == config.max_retries:
                break
            if retry_after is not None and retry_after > config.max_retry_after:
                last_detail += f"; Retry-After {retry_after:.0f} s exceeds max_retry_after {config.max_retry_after:.0f} s"
                break
            delay = backoff_seconds(attempt, config.backoff_base, config.backoff_max, self._rng)
            if retry_after is not None:
                delay = max(delay, retry_after)
            with self._lock:
                usage.retries += 1
            logger.warning(
                "report %s: %s (%s); retry %d of %d in %.2f s",
                report_id, last_reason, last_detail, attempt + 1, config.max_retries, delay,
            )
            time.sleep(delay)
        raise RequestFailedError(last_reason, f"{last_detail} (after {attempts} attempts)")

    def _entry_from_response(self, response: Any) -> dict[str, Any]:
        choice = response.choices[0] if response.choices else None
        message = choice.message if choice is not None else None
        usage = response.usage
        return {
            "content": message.content if message is not None else None,
            "refusal": getattr(message, "refusal", None),
            "finish_reason": choice.finish_reason if choice is not None else None,
            "prompt_tokens": usage.prompt_tokens if usage is not None else 0,
            "completion_tokens": usage.completion_tokens if usage is not None else 0,
        }

    # ----------------------------------------------------------------------------------------
    # Whole run
    # ----------------------------------------------------------------------------------------

    def extract(self, reports: pl.DataFrame) -> LLMResult:
        """Extract entities from ``reports`` (columns report_id, text; text_sha256 used when present)."""
        missing = {"report_id", "text"} - set(reports.columns)
        if missing:
            raise ValueError(f"reports table lacks columns {sorted(missing)}; it needs report_id and text")
        self._abort.clear()
        usage = LLMUsage()
        limiter = RateLimiter(self.config.requests_per_minute)

        failures: list[dict[str, str]] = []
        ids_by_hash: dict[str, list[str]] = {}
        text_by_hash: dict[str, str] = {}
        texts: dict[str, str] = {}
        for report_id, text in reports.select("report_id", "text").iter_rows():
            if text is None or not text.strip():
                failures.append({"report_id": report_id, "reason": "empty-text", "detail": "no text to label"})
                continue
            # Hashed here rather than taken from text_sha256, so the key always matches the text sent.
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            ids_by_hash.setdefault(digest, []).append(report_id)
            text_by_hash[digest] = text
            texts[report_id] = text

        entries: dict[str, dict[str, Any]] = {}
        to_request: list[str] = []
        for digest in ids_by_hash:
            entry = self.cache.get(cache_key(self.config.model, PROMPT_VERSION, digest))
            if entry is not None:
                entries[digest] = entry
                usage.cache_hits += 1
            else:
                to_request.append(digest)
        logger.info(
            "LLM extractor %s: %d reports, %d distinct texts, %d from cache, %d to request",
            self.version, reports.height, len(ids_by_hash), usage.cache_hits, len(to_request),
        )

        if to_request:
            self.client()  # created once here, not by several worker threads at the same time
            with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="llm") as pool:
                futures = {
                    pool.submit(self._answer_and_cache, ids_by_hash[digest][0], digest, text_by_hash[digest], limiter, usage): digest
                    for digest in to_request
                }
                for future in as_completed(futures):
                    digest = futures[future]
                    try:
                        entries[digest] = future.result()
                    except (RequestFailedError, AnswerFormatError) as error:
                        logger.error("LLM request failed for reports %s: %s", ids_by_hash[digest], error)
                        failures.extend(
                            {"report_id": report_id, "reason": error.reason, "detail": error.detail}
                            for report_id in ids_by_hash[digest]
                        )

        rows: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        for digest, entry in entries.items():
            for report_id in ids_by_hash[digest]:
                try:
                    parsed = self._parse_entry(entry)
                except AnswerFormatError as error:
                    failures.append({"report_id": report_id, "reason": error.reason, "detail": error.detail})
                    continue
                rows.extend(self._entity_rows(report_id, texts[report_id], parsed))
                rejected.extend({"report_id": report_id, **item} for item in parsed.rejected)

        usage.failed = len(failures)
        usage.estimated_cost_usd = self._estimate_cost(usage)
        result = LLMResult(
            entities=pl.DataFrame(rows, schema=ENTITY_SCHEMA),
            failures=pl.DataFrame(failures, schema=FAILURE_SCHEMA),
            rejected_findings=pl.DataFrame(rejected, schema=REJECTED_SCHEMA),
            usage=usage,
        )
        logger.info(
            "LLM extractor done: %d entities, %d failed reports, %d rejected items, %d requests, %d cache hits",
            result.entities.height, result.failures.height, result.rejected_findings.height, usage.requests, usage.cache_hits,
        )
        if result.failures.height:
            logger.warning("LLM failures by reason: %s", dict(result.failures["reason"].value_counts().iter_rows()))
        return result

    def _answer_and_cache(self, report_id: str, digest: str, text: str, limiter: RateLimiter, usage: LLMUsage) -> dict[str, Any]:
        entry = self._request(report_id, text, limiter, usage)
        # An unusable answer is not cached, so the next run asks again.
        self._parse_entry(entry)
        entry.update({"model": self.config.model, "prompt_version": PROMPT_VERSION, "text_sha256": digest})
        self.cache.put(cache_key(self.config.model, PROMPT_VERSION, digest), entry)
        return entry

    def _parse_entry(self, entry: dict[str, Any]) -> ParsedAnswer:
        if entry.get("refusal"):
            raise AnswerFormatError("refused", "the model returned a refusal")
        if entry.get("finish_reason") == "length":
            raise AnswerFormatError("truncated", "the response was cut off at max_completion_tokens")
        return parse_answer(entry.get("content"), self.queries)

    def _entity_rows(self, report_id: str, text: str, parsed: ParsedAnswer) -> list[dict[str, Any]]:
        # Offsets: first case-insensitive occurrence of the evidence, else of the finding name,
        # else -1 (the model paraphrased). They are approximate: a phrase that occurs twice
        # always points at its first occurrence.
        lowered = text.lower()
        starts = sentence_starts(text)
        rows = []
        for finding in parsed.findings:
            char_start, char_end, surface = -1, -1, finding.evidence or finding.name
            for needle in (finding.evidence.strip(), finding.name):
                position = lowered.find(needle.lower()) if needle else -1
                if position >= 0:
                    char_start, char_end = position, position + len(needle)
                    surface = text[char_start:char_end]
                    break
            rows.append(
                {
                    "report_id": report_id,
                    "sentence_index": bisect.bisect_right(starts, char_start) - 1 if char_start >= 0 else -1,
                    "char_start": char_start,
                    "char_end": char_end,
                    "entity": surface,
                    "query": finding.name,
                    "category": CATEGORY_BY_STATUS[finding.status],
                    "cui": None,
                    "semantic_type": None,
                    "extractor": EXTRACTOR_NAME,
                    "extractor_version": self.version,
                }
            )
        return rows

    def _estimate_cost(self, usage: LLMUsage) -> float | None:
        prompt_price = self.config.prompt_price_per_million
        completion_price = self.config.completion_price_per_million
        if prompt_price is None or completion_price is None:
            return None
        return (usage.prompt_tokens * prompt_price + usage.completion_tokens * completion_price) / 1_000_000


def _status_detail(error: openai.APIStatusError) -> str:
    # The server's error message only: the request body (with the report) is never included.
    message = getattr(error, "message", "") or ""
    return f"HTTP {error.status_code}: {message[:200]}"


def extract_with_llm_from_args(reports_df: pl.DataFrame, args: Any) -> pl.DataFrame:
    """Run the LLM extractor for the command line; ``args`` has base_url, model and optional settings.

    Failures are logged by reason and the entity table of the answered reports is returned.
    """
    settings = {
        name: getattr(args, name)
        for name in (
            "api_key_env",
            "cache_dir",
            "concurrency",
            "requests_per_minute",
            "allow_public_endpoint",
            "timeout",
            "max_retries",
            "azure",
            "azure_api_version",
        )
        if getattr(args, name, None) is not None
    }
    config = LLMConfig(base_url=args.base_url, model=args.model, **settings)
    result = LLMExtractor(config).extract(reports_df)
    if result.failures.height:
        logger.warning(
            "%d of %d reports have no LLM labels (see the log for reasons); re-run to retry them, answered "
            "reports come from the cache in %s",
            result.failures.height, reports_df.height, config.cache_dir,
        )
    return result.entities
