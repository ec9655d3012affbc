"""An OpenAI-compatible chat-completions server on 127.0.0.1 with scripted behaviours, for tests.

The answer to a report follows markers in the report text:

- no marker: a valid answer; each query name found in the text is "present", "absent" after
  "no ", "uncertain" after "possible ", with the matched phrase as evidence
- ``[malformed]``: content that is not JSON
- ``[unknown-label]``: a valid answer plus a finding that is not a query entity
- ``[429-once]`` / ``[500-once]``: HTTP 429 (``Retry-After: 1``) or 500 on the first request
  for that text, then a valid answer; ``[429-always]`` / ``[500-always]`` on every request
- ``[slow-once]`` / ``[slow-always]``: sleep ``slow_seconds`` before answering

With ``api_key`` set, a request with another key (Bearer or ``api-key`` header) gets HTTP 401.
Every answer reports 100 prompt and 20 completion tokens. ``die_after`` makes the process
exit right after sending that many answers, as a crashed server would.
Run as a script (``python tests/llm_server.py --die-after 4``) it prints its port and serves.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kad_pipeline.queries import KAD_QUERIES  # noqa: E402

PROMPT_TOKENS = 100
COMPLETION_TOKENS = 20
_REPORT_RE = re.compile(r"<<<\n(.*)\n>>>", re.DOTALL)


class ServerState:
    """Counters and recorded requests, shared by the handler threads."""

    def __init__(self, slow_seconds: float = 2.0, die_after: int | None = None, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.lock = threading.Lock()
        self.requests = 0
        self.answered = 0
        self.requests_by_text: Counter[str] = Counter()
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.bodies: list[dict[str, Any]] = []
        self.slow_seconds = slow_seconds
        self.die_after = die_after


def answer_content(text: str) -> str:
    """Return the JSON answer of the scripted model for a report text."""
    if "[malformed]" in text:
        return '{"findings": [{"name": "edema", "status": '
    lowered = text.lower()
    findings = []
    for query in KAD_QUERIES:
        if query == "normal" or not re.search(rf"\b{query}\b", lowered):
            continue
        status = "present"
        if re.search(rf"\bno {query}\b", lowered):
            status = "absent"
        elif re.search(rf"\bpossible {query}\b", lowered):
            status = "uncertain"
        findings.append({"name": query, "status": status, "evidence": query})
    if "[unknown-label]" in text:
        findings.append({"name": "pulmonary fibrosis", "status": "present", "evidence": "fibrosis"})
    return json.dumps({"findings": findings})


def make_handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            body = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()

        def do_GET(self) -> None:
            if self.path != "/stats":
                self._send_json(404, {"error": {"message": "not found"}})
                return
            with state.lock:
                payload = {"requests": state.requests, "answered": state.answered}
            self._send_json(200, payload)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if not self.path.split("?")[0].endswith("/chat/completions"):
                self._send_json(404, {"error": {"message": f"unknown path {self.path}"}})
                return
            user_content = body["messages"][-1]["content"]
            match = _REPORT_RE.search(user_content)
            text = match.group(1) if match else user_content
            with state.lock:
                state.requests += 1
                state.requests_by_text[text] += 1
                seen = state.requests_by_text[text]
                state.paths.append(self.path)
                state.headers.append({name.lower(): value for name, value in self.headers.items()})
                state.bodies.append(body)

            presented = self.headers.get("api-key") or self.headers.get("Authorization", "").removeprefix("Bearer ")
            if state.api_key is not None and presented != state.api_key:
                self._send_json(401, {"error": {"message": "invalid API key", "type": "invalid_request_error"}})
                return
            if "[429-always]" in text or ("[429-once]" in text and seen == 1):
                self._send_json(
                    429, {"error": {"message": "rate limit reached", "type": "rate_limit"}}, {"Retry-After": "1"}
                )
                return
            if "[500-always]" in text or ("[500-once]" in text and seen == 1):
                self._send_json(500, {"error": {"message": "internal error", "type": "server_error"}})
                return
            if "[slow-always]" in text or ("[slow-once]" in text and seen == 1):
                time.sleep(state.slow_seconds)

            self._send_json(
                200,
                {
                    "id": f"chatcmpl-{state.requests}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "test-model"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer_content(text)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": PROMPT_TOKENS,
                        "completion_tokens": COMPLETION_TOKENS,
                        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                    },
                },
            )
            with state.lock:
                state.answered += 1
                should_die = state.die_after is not None and state.answered >= state.die_after
            if should_die:
                # Exit without closing sockets, as a killed process would.
                os._exit(0)

    return Handler


class ChatServer:
    """The scripted server in a background thread; ``base_url`` ends in ``/v1``."""

    def __init__(self, slow_seconds: float = 2.0, port: int = 0, api_key: str | None = None) -> None:
        self.state = ServerState(slow_seconds=slow_seconds, api_key=api_key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(self.state))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Scripted OpenAI-compatible server for tests.")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1; 0 picks a free one.")
    parser.add_argument("--die-after", type=int, default=None, help="Exit after sending this many answers.")
    parser.add_argument("--slow-seconds", type=float, default=2.0, help="Delay of the [slow-*] markers, seconds.")
    arguments = parser.parse_args()
    state = ServerState(slow_seconds=arguments.slow_seconds, die_after=arguments.die_after)
    httpd = ThreadingHTTPServer(("127.0.0.1", arguments.port), make_handler(state))
    httpd.daemon_threads = True
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
