"""``adapterswap.Client``: a small Python client for the HTTP API (see API.md).

Any OpenAI client works against the server too; this one adds AdapterSwap's fields and
endpoints with no dependency beyond httpx2 (the HTTP library the openai package uses).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import httpx2 as httpx


class APIError(Exception):
    """A non-2xx answer; ``status`` and the OpenAI-shaped ``error`` body are kept."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.error = body.get("error", body)
        super().__init__(f"HTTP {status}: {self.error.get('message', body)}")


class Client:
    """``Client(base_url, api_key)``; every method returns the decoded JSON answer."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 120.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, path, json=body)
        if response.status_code >= 400:
            raise APIError(response.status_code, _json_or_text(response))
        return response.json()

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthz")

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/models")["data"]

    def adapters(self, page_size: int = 100) -> list[dict[str, Any]]:
        """Every adapter this key may see, in id order, following the pages."""
        return list(self.iter_adapters(page_size))

    def iter_adapters(self, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """The adapters this key may see, one page (``page_size``, 1-1000) fetched at a time."""
        after: str | None = None
        while True:
            params = {"limit": page_size} | ({} if after is None else {"after": after})
            page = self._call("GET", f"/v1/adapters?{urlencode(params)}")
            yield from page["data"]
            if not page["has_more"]:
                return
            after = page["last_id"]

    def completions(self, prompt: str | list[str], **fields: Any) -> dict[str, Any]:
        """``POST /v1/completions``; ``fields`` are any body fields (max_tokens, adapters, ...)."""
        return self._call("POST", "/v1/completions", {"prompt": prompt, **fields})

    def chat(self, messages: list[dict[str, str]], **fields: Any) -> dict[str, Any]:
        """``POST /v1/chat/completions``."""
        return self._call("POST", "/v1/chat/completions", {"messages": messages, **fields})

    # -- knowledge management (admin keys) -------------------------------------------------

    def ingest(self, documents: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        """``POST /v1/documents``: all accepted or none."""
        return self._call("POST", "/v1/documents", {"documents": documents, **fields})

    def document(self, doc_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/documents/{doc_id}")

    def delete(self, doc_id: str) -> dict[str, Any]:
        """``DELETE /v1/documents/{id}``: returns once every replica dropped its adapters."""
        return self._call("DELETE", f"/v1/documents/{doc_id}")

    def train(self) -> dict[str, Any]:
        """``POST /v1/train``: ``{"job": id, "state": "pending"}``."""
        return self._call("POST", "/v1/train")

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def audit(self, since: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/audit?since={since}&limit={limit}")["data"]

    def stream_chat(self, messages: list[dict[str, str]], **fields: Any) -> Iterator[str]:
        """Text deltas of a streamed chat completion, as they arrive."""
        body = {"messages": messages, **fields, "stream": True}
        with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise APIError(response.status_code, _json_or_text(response))
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise APIError(500, chunk)
                yield chunk["choices"][0]["delta"].get("content", "")


def _json_or_text(response: httpx.Response) -> dict[str, Any]:
    try:
        return response.json()
    except ValueError:
        return {"error": {"message": response.text}}
