"""Persistent answer cache and request rate limiter of the LLM extractor."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def cache_key(model: str, prompt_version: str, text_sha256: str) -> str:
    """Return the cache key of one answer: a SHA-256 over model, prompt version and text hash."""
    return hashlib.sha256(f"{model}\0{prompt_version}\0{text_sha256}".encode("utf-8")).hexdigest()


class AnswerCache:
    """One JSON file per answer under ``directory/<first two hex digits>/<key>.json``.

    Files are written to a temporary name and moved into place with ``os.replace``, so a run
    killed mid-write leaves either the whole answer or nothing. Entries store the answer
    content (which quotes report text as evidence), token usage and the text hash, never the
    report text itself. Treat the folder as patient data.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_of(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """Return the stored entry, or None when absent or unreadable (an unreadable one is logged)."""
        path = self.path_of(key)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as error:
            logger.warning("ignoring unreadable cache entry %s: %s", path, error)
            return None
        return entry if isinstance(entry, dict) else None

    def put(self, key: str, entry: dict[str, Any]) -> Path:
        path = self.path_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as handle:
            json.dump(entry, handle)
        os.replace(handle.name, path)
        return path

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("??/*.json"))


class RateLimiter:
    """Spaces request starts at least ``60 / requests_per_minute`` seconds apart, across threads."""

    def __init__(self, requests_per_minute: float | None) -> None:
        if requests_per_minute is not None and requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be positive or None, got {requests_per_minute}")
        self.interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._lock = threading.Lock()
        self._next_start = 0.0

    def acquire(self) -> float:
        """Block until the next request may start; return the seconds waited."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self.interval
        wait = start - now
        if wait > 0:
            time.sleep(wait)
        return wait
