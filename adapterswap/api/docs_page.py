"""The API docs page (Swagger UI) with its assets served from the installed package.

FastAPI's own ``/docs`` loads Swagger UI from a CDN, so it is blank offline. Here the page
and its three assets come from ``swagger-ui-bundle-v2`` (Swagger UI's dist files, Apache-2.0),
under ``/docs/assets/``. Like ``/openapi.json`` they describe the public contract and nothing
else, so they answer without a key. ReDoc is not served: one docs page is enough.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from swagger_ui_bundle import swagger_ui_path

from adapterswap.api.errors import error_body

DOCS_PATH = "/docs"
ASSETS_PATH = f"{DOCS_PATH}/assets"

# The only files served, with their content types: nothing else in the bundle is reachable.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


def add_docs_page(app: FastAPI) -> None:
    """Serve Swagger UI for ``app.openapi_url`` at :data:`DOCS_PATH`, assets included."""

    # The endpoints reach the app through the request, never as a closure: FastAPI caches
    # endpoint functions process-wide, and one holding ``app`` would keep every app built in
    # the process (with its gateway and model replica) alive.
    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs_page(request: Request) -> HTMLResponse:
        # Behind a proxy that mounts the app under a prefix, every URL carries the prefix.
        root = request.scope.get("root_path", "").rstrip("/")
        served = request.app
        return get_swagger_ui_html(
            openapi_url=f"{root}{served.openapi_url}",
            title=f"{served.title} - API docs",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
            # Swagger UI would otherwise send the schema to validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(f"{ASSETS_PATH}/{{name}}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            body = error_body(f"no docs asset {name!r}", "not_found_error")
            return JSONResponse(body, status_code=404)
        return FileResponse(swagger_ui_path / name, media_type=media_type)
