"""The FastAPI app: HTTP in, :class:`~adapterswap.gateway.Gateway` calls, OpenAI-shaped JSON out.

The app holds no state of its own: ``app.state.gateway`` is set by whoever serves it (the
Ray Serve ingress deployment, or a test). Bodies are size-checked before parsing, parsed and
validated once, and every error goes through :func:`adapterswap.http_errors.from_exception`,
so a bad request gets a 4xx with the field named and never takes the server down.
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

from adapterswap.errors import AdapterSwapError, InvalidArgument, PayloadTooLarge
from adapterswap.gateway import Gateway
from adapterswap.http_errors import error_body, from_exception
from adapterswap.keys import Principal
from adapterswap.schemas import ChatRequest, CompletionRequest, DocumentsRequest

logger = logging.getLogger("adapterswap.http")


async def _body(request: Request, model: type[BaseModel], limit: int) -> Any:
    raw = await request.body()
    if len(raw) > limit:
        raise PayloadTooLarge(f"body is {len(raw)} bytes, over serve.max_body_bytes={limit}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("body must be a JSON object")
    return model.model_validate(data)


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def _principal(request: Request) -> Principal:
    """The caller; off the event loop, since a key-cache miss reads the store."""
    header = request.headers.get("authorization")
    return await asyncio.to_thread(_gateway(request).auth.authenticate, header)


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
    except Exception as exc:  # noqa: BLE001 - the status line is gone; report in-stream
        logger.exception("stream failed")
        yield f"data: {json.dumps(from_exception(exc)[1])}\n\n".encode()
    yield b"data: [DONE]\n\n"


_BODIES = (CompletionRequest, ChatRequest, DocumentsRequest)


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
    )

    # Expected errors (4xx, 503) are answered here. Starlette treats an `Exception` handler as
    # the 500 handler, which re-raises after answering, so only the unexpected go there.
    @app.exception_handler(AdapterSwapError)
    @app.exception_handler(ValidationError)
    @app.exception_handler(RequestValidationError)
    async def _expected(request: Request, exc: Exception) -> JSONResponse:
        status, body = from_exception(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed", exc_info=exc)
        status, body = from_exception(exc)
        return JSONResponse(body, status_code=status)

    @app.middleware("http")
    async def _log(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
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

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        await _principal(request)
        return _gateway(request).list_models()

    @app.get("/v1/adapters")
    async def adapters(request: Request) -> dict[str, Any]:
        principal = await _principal(request)
        return await asyncio.to_thread(_gateway(request).list_adapters, principal)

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Any:
        principal = await _principal(request)
        gateway = _gateway(request)
        body = await _body(request, CompletionRequest, gateway.config.serve.max_body_bytes)
        if not body.stream:
            return await gateway.complete(principal, body)
        if len(body.prompts) != 1 or body.echo:
            raise InvalidArgument("stream: supported for a single prompt without echo")
        jobs, info = await asyncio.to_thread(gateway.completion_jobs, principal, body)
        return StreamingResponse(
            _sse(gateway.stream_chunks(jobs[0], info, chat=False)), media_type="text/event-stream"
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
            _sse(gateway.stream_chunks(job, info, chat=True)), media_type="text/event-stream"
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
