"""The FastAPI app: HTTP in, :class:`~adapterswap.api.gateway.Gateway` calls, OpenAI-shaped JSON out.

The app holds no state of its own: ``app.state.gateway`` is set by whoever serves it (the
Ray Serve ingress deployment, or a test). Every error goes through
:func:`adapterswap.api.errors.error_reply`, so a bad request gets a 4xx with the field
named, an unexpected failure a 500 with a request id, and neither takes the server down.

What a request may cost before it is authenticated and parsed is bounded:

- a ``Content-Length`` over ``serve.max_body_bytes`` is a 413 before any byte of the body
  is read, on every path; a chunked body is read incrementally and cut off at the limit;
- the key is checked by :class:`~adapterswap.api.auth.Authenticator` (malformed keys never
  reach the store) before the body is read;
- JSON that would exhaust the parser is a 400: nesting deeper than :data:`MAX_JSON_DEPTH`,
  integers past Python's digit limit (``RecursionError`` and ``ValueError`` from ``json``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from adapterswap.api.docs_page import add_docs_page
from adapterswap.api.errors import error_body, error_reply
from adapterswap.api.gateway import Gateway
from adapterswap.api.schemas import (
    MAX_PAGE,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    DocumentsRequest,
    TokenizeRequest,
)
from adapterswap.errors import AdapterSwapError, InvalidArgument, PayloadTooLarge
from adapterswap.types import Principal

logger = logging.getLogger("adapterswap.http")

# Deepest JSON nesting a body may have. Our bodies need 4 levels (documents[].metadata
# holds the caller's own JSON); 64 leaves metadata room while keeping every later
# json.dumps of it far from the interpreter's recursion limit.
MAX_JSON_DEPTH = 64


def _declared_length(request: Request, limit: int) -> int | None:
    """The body's ``Content-Length``; PayloadTooLarge past ``limit``, before reading a byte."""
    header = request.headers.get("content-length")
    if header is None:
        return None
    if not header.strip().isdigit():
        raise InvalidArgument(f"Content-Length: got {header[:32]!r}; expected a byte count")
    length = int(header)
    if length > limit:
        raise PayloadTooLarge(f"body is {length} bytes, over serve.max_body_bytes={limit}")
    return length


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read chunk by chunk and cut off as soon as it passes ``limit``."""
    _declared_length(request, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over serve.max_body_bytes={limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_depth(data: Any, limit: int) -> None:
    """InvalidArgument if ``data`` nests deeper than ``limit``; iterative, so it cannot
    itself exhaust the stack."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        if children and depth >= limit:
            raise InvalidArgument(f"body: JSON nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A JSON object from ``raw``, or InvalidArgument saying what is wrong with it."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # int-str conversion limit: an integer of thousands of digits
        raise InvalidArgument(f"body: a number is too long to parse ({str(exc)[:80]})") from None
    if not isinstance(data, dict):
        raise InvalidArgument("body must be a JSON object")
    _check_depth(data, MAX_JSON_DEPTH)
    return data


async def _body(request: Request, model: type[BaseModel], limit: int) -> Any:
    return model.model_validate(parse_json_body(await _read_body(request, limit)))


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def _principal(request: Request) -> Principal:
    """The caller: header and cache checks inline, a store lookup on the authenticator's
    own threads."""
    header = request.headers.get("authorization")
    return await _gateway(request).auth.authenticate_async(header)


def _error_response(exc: BaseException) -> JSONResponse:
    reply = error_reply(exc)
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
    except Exception as exc:  # noqa: BLE001 - the status line is gone; report in-stream
        yield f"data: {json.dumps(error_reply(exc).body)}\n\n".encode()
    yield b"data: [DONE]\n\n"


_BODIES = (CompletionRequest, ChatRequest, DocumentsRequest, TokenizeRequest, DetokenizeRequest)


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body we parse ourselves (size check first), so /openapi.json documents it."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _with_body_components(app: FastAPI) -> None:
    """Add the body models (and the models they use) to the OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in _BODIES:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
        return app.openapi_schema or schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app() -> FastAPI:
    """The AdapterSwap HTTP API (see API.md). Set ``app.state.gateway`` before serving."""
    app = FastAPI(
        title="AdapterSwap",
        version="0.1.0",
        description="OpenAI-compatible API with per-request LoRA composition.",
        # FastAPI's pages load their assets from a CDN; add_docs_page serves ours.
        docs_url=None,
        redoc_url=None,
    )
    add_docs_page(app)

    # Errors we raise on purpose, and pydantic's, become their status here (Starlette's
    # exception middleware, inside the one below).
    @app.exception_handler(AdapterSwapError)
    @app.exception_handler(ValidationError)
    @app.exception_handler(RequestValidationError)
    async def _expected(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(exc)

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Any:
        """Refuse an oversized body before the endpoint runs; turn anything unexpected into
        a 500 with a request id (logged once, by error_reply); one log line per request."""
        started = time.perf_counter()
        gateway = getattr(request.app.state, "gateway", None)
        try:
            if gateway is not None:
                _declared_length(request, gateway.config.serve.max_body_bytes)
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - the one place the unexpected is answered
            response = _error_response(exc)
        # One line per request; never the prompt text.
        logger.info(
            json.dumps(
                {
                    "path": request.url.path,
                    "status": response.status_code,
                    "ms": round(1000 * (time.perf_counter() - started), 1),
                }
            )
        )
        return response

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # The tokenizer's endpoints answer without a key, as vLLM's do (see api/tokenizer.py).
    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict[str, Any]:
        return _gateway(request).tokenizer_info()

    @app.post("/tokenize", openapi_extra=_body_schema(TokenizeRequest))
    async def tokenize(request: Request) -> dict[str, Any]:
        gateway = _gateway(request)
        body = await _body(request, TokenizeRequest, gateway.config.serve.max_body_bytes)
        return await asyncio.to_thread(gateway.tokenize, body)

    @app.post("/detokenize", openapi_extra=_body_schema(DetokenizeRequest))
    async def detokenize(request: Request) -> dict[str, Any]:
        gateway = _gateway(request)
        body = await _body(request, DetokenizeRequest, gateway.config.serve.max_body_bytes)
        return await asyncio.to_thread(gateway.detokenize, body)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        principal = await _principal(request)
        return await asyncio.to_thread(_gateway(request).list_models, principal)

    @app.get("/v1/adapters")
    async def adapters(
        request: Request,
        limit: int = Query(
            100, ge=1, le=MAX_PAGE, description=f"At most this many adapters (1-{MAX_PAGE})."
        ),
        after: str | None = Query(
            None, max_length=1024, description="Adapters with ids after this one (a cursor)."
        ),
    ) -> dict[str, Any]:
        principal = await _principal(request)
        return await asyncio.to_thread(_gateway(request).list_adapters, principal, limit, after)

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Any:
        principal = await _principal(request)
        gateway = _gateway(request)
        body = await _body(request, CompletionRequest, gateway.config.serve.max_body_bytes)
        if not body.stream:
            return await gateway.complete(principal, body)
        if len(body.prompts) != 1 or body.echo:
            raise InvalidArgument("stream: supported for a single prompt without echo")
        jobs, infos = await asyncio.to_thread(gateway.completion_jobs, principal, body)
        return StreamingResponse(
            _sse(gateway.stream_chunks(principal, jobs[0], infos[0], False, body.include_usage)),
            media_type="text/event-stream",
        )

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatRequest))
    async def chat(request: Request) -> Any:
        principal = await _principal(request)
        gateway = _gateway(request)
        body = await _body(request, ChatRequest, gateway.config.serve.max_body_bytes)
        if not body.stream:
            return await gateway.chat(principal, body)
        job, info = await asyncio.to_thread(gateway.chat_job, principal, body)
        return StreamingResponse(
            _sse(gateway.stream_chunks(principal, job, info, True, body.include_usage)),
            media_type="text/event-stream",
        )

    @app.post("/v1/documents", openapi_extra=_body_schema(DocumentsRequest))
    async def ingest(request: Request) -> dict[str, Any]:
        principal = await _principal(request)
        gateway = _gateway(request)
        body = await _body(request, DocumentsRequest, gateway.config.serve.max_body_bytes)
        return await asyncio.to_thread(gateway.ingest, principal, body)

    @app.get("/v1/documents/{doc_id}")
    async def document(request: Request, doc_id: str) -> dict[str, Any]:
        principal = await _principal(request)
        return await asyncio.to_thread(_gateway(request).document, principal, doc_id)

    @app.delete("/v1/documents/{doc_id}")
    async def delete(request: Request, doc_id: str) -> dict[str, Any]:
        principal = await _principal(request)
        return await asyncio.to_thread(_gateway(request).delete_document, principal, doc_id)

    @app.post("/v1/train")
    async def train(request: Request) -> dict[str, Any]:
        principal = await _principal(request)
        return await asyncio.to_thread(_gateway(request).submit_training, principal)

    @app.get("/v1/jobs/{job_id}")
    async def job(request: Request, job_id: str) -> dict[str, Any]:
        principal = await _principal(request)
        return await asyncio.to_thread(_gateway(request).job, principal, job_id)

    @app.get("/v1/audit")
    async def audit(
        request: Request,
        since: int = Query(
            0, ge=0, le=2**63 - 1, description="Entries after this sequence number."
        ),
        limit: int = Query(100, ge=1, le=1000, description="At most this many entries."),
    ) -> dict[str, Any]:
        principal = await _principal(request)
        return await asyncio.to_thread(_gateway(request).audit, principal, since, limit)

    @app.api_route(
        "/v1/{rest:path}",
        methods=["GET", "POST", "DELETE", "PUT", "PATCH"],
        include_in_schema=False,
    )
    async def unknown(request: Request, rest: str) -> JSONResponse:
        await _principal(request)
        return JSONResponse(
            error_body(f"no endpoint /v1/{rest}", "not_found_error"), status_code=404
        )

    _with_body_components(app)
    return app
