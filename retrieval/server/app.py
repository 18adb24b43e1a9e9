"""The FastAPI app of `retr serve`: `create_app(settings)` and `serve(settings, ...)`.

The lifespan opens the index and loads the models once per process (Service.open) and closes
them at shutdown; routes get the Service through a dependency. The web page is static (no build
step): `/` serves static/index.html, `/static/*` its script and style.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from index.layout import IndexPaths
from retrieval.server.errors import install_error_handlers
from retrieval.server.limits import BodyLimit, TokenGate
from retrieval.server.routes import router
from retrieval.server.service import Service
from retrieval.server.settings import ServerSettings

STATIC = Path(__file__).parent / "static"
SETTINGS_ENV = "RETR_SERVE_SETTINGS"
"""Environment variable that hands the settings to worker processes (`--workers N`)."""


def create_app(settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service.open(settings)
        app.state.service = service
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="retr",
        summary="Landmark image search, recognition and index updates, with match pictures.",
        lifespan=lifespan,
        docs_url=None,  # served below from local files: FastAPI's default loads them from a CDN
    )
    install_error_handlers(app, settings.retry_after)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(  # outermost: before any body is read
        TokenGate, token=settings.token, private_reads=settings.private_reads
    )
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    _offline_docs(app)
    return app


def _offline_docs(app: FastAPI) -> None:
    """The OpenAPI page at /docs with Swagger UI's files from the swagger-ui-bundle package, so
    it works without internet (FastAPI's default fetches them from a CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-static", StaticFiles(directory=swagger_ui_path), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="retr API",
            swagger_js_url="/docs-static/swagger-ui-bundle.js",
            swagger_css_url="/docs-static/swagger-ui.css",
            swagger_favicon_url="/docs-static/favicon-32x32.png",
        )


def app_from_env() -> FastAPI:
    """The app of one worker process, from the settings `serve` put in the environment."""
    return create_app(ServerSettings.model_validate_json(os.environ[SETTINGS_ENV]))


def serve(
    settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1
) -> None:
    """Run the service with uvicorn until interrupted. Workers > 1: separate processes, each
    with its own models, sharing one folder of recent searches (so any worker draws the match
    pictures of any search) and the index (writes serialised by its write lock)."""
    import uvicorn

    IndexPaths(settings.index).read_config()  # not an index: one line now, not a traceback
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port)
        return
    scratch = settings.scratch or Path(tempfile.mkdtemp(prefix="retr-serve-"))
    shared = settings.model_copy(update={"scratch": scratch})
    os.environ[SETTINGS_ENV] = shared.model_dump_json()
    try:
        uvicorn.run(
            "retrieval.server.app:app_from_env", factory=True, host=host, port=port, workers=workers
        )
    finally:
        if settings.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
