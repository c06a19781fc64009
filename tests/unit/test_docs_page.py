"""The API docs page works offline: every asset it loads comes from this server, keyless."""

from __future__ import annotations

import gc
import weakref
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from support import in_process_app

from adapterswap.store.registry import AdapterRegistry


class _Loads(HTMLParser):
    """The URLs a page makes the browser fetch: script src and link href."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src"}.get(tag)
        self.urls += [value for name, value in attrs if name == wanted and value]


def loaded_urls(html: str) -> list[str]:
    parser = _Loads()
    parser.feed(html)
    return parser.urls


@pytest.fixture(scope="module")
def client(tiny_config):
    config = tiny_config()
    app, _ = in_process_app(config, AdapterRegistry(config.db_path))
    return TestClient(app, raise_server_exceptions=False)


def test_the_docs_page_and_its_assets_are_served_here_without_a_key(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    urls = loaded_urls(page.text)
    assert len(urls) == 3, urls  # the script, the stylesheet, the favicon
    assert all(not urlsplit(url).scheme and not urlsplit(url).netloc for url in urls), urls
    # Swagger UI's default would post the schema to validator.swagger.io from the browser.
    assert '"validatorUrl": null' in page.text
    assets = {url.rsplit(".", 1)[-1]: client.get(url) for url in urls}
    assert all(asset.status_code == 200 for asset in assets.values()), urls
    types = {kind: asset.headers["content-type"].split(";")[0] for kind, asset in assets.items()}
    assert types == {"js": "text/javascript", "css": "text/css", "png": "image/png"}
    assert "SwaggerUIBundle" in assets["js"].text and ".swagger-ui" in assets["css"].text
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and schema.json()["openapi"].startswith("3.")


def test_only_the_named_assets_are_served_and_the_api_keeps_its_key(client):
    assert client.get("/docs/assets/index.html").status_code == 404
    assert client.get("/docs/assets/..%2F..%2Fpyproject.toml").status_code == 404
    assert client.get("/redoc").status_code == 404
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/docs").status_code == 401


def test_behind_a_path_prefix_the_page_loads_everything_under_it(client):
    prefixed = TestClient(client.app, root_path="/adapterswap").get("/docs")
    assert prefixed.status_code == 200
    for url in loaded_urls(prefixed.text):
        assert url.startswith("/adapterswap/docs/assets/"), url
    assert "url: '/adapterswap/openapi.json'" in prefixed.text


def test_an_app_dropped_after_serving_every_page_is_freed_with_its_model_replica(tiny_config):
    """FastAPI caches endpoint functions process-wide: an endpoint closing over the app kept
    every app built in a process alive, model replica and all (the test suite grew to 24 GB
    and was killed)."""
    config = tiny_config()
    registry = AdapterRegistry(config.db_path)
    app, replica = in_process_app(config, registry)
    key = registry.create_key("ann", ["hr"])[0]
    with TestClient(app) as served:
        assert served.get("/docs").status_code == 200
        assert served.get("/docs/assets/swagger-ui.css").status_code == 200
        assert served.get("/tokenizer_info").status_code == 200
        auth = {"Authorization": f"Bearer {key}"}
        assert served.get("/v1/models", headers=auth).status_code == 200
        body = {"prompt": "hi", "max_tokens": 1}
        assert served.post("/v1/completions", json=body, headers=auth).status_code == 200
    replica_ref = weakref.ref(replica)
    del app, replica, served
    gc.collect()
    assert replica_ref() is None
