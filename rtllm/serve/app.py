"""The FastAPI application: OpenAI routes, health, metrics and version over one shared LLM."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import rtllm
from rtllm.serve import DEFAULT_STALL_TIMEOUT_S
from rtllm.serve.errors import OpenAIError
from rtllm.serve.generation import ServingContext
from rtllm.serve.openai_chat import create_chat_completion
from rtllm.serve.openai_completions import create_completion
from rtllm.serve.protocol import ModelCard, ModelList

if TYPE_CHECKING:
    from rtllm.llmapi.llm import LLM

logger = logging.getLogger(__name__)


def engine_health(ctx: ServingContext) -> tuple[bool, str]:
    """``(healthy, reason)``: the engine loop is alive and advancing whenever it has work.

    A stall is measured from the later of the last completed step and the arrival of
    the oldest request still in flight, so an engine that just woke up from idle
    gets a full ``stall_timeout_s`` for its first step.
    """
    try:
        executor = ctx.llm.executor
    except RuntimeError:
        return False, "the engine has been shut down"
    if not executor.is_alive:
        return False, executor.failure or "the engine loop has stopped"
    if executor.has_work:
        now = time.monotonic()
        reference = getattr(executor, "last_step_time", now)
        oldest = ctx.metrics.oldest_inflight_arrival()
        if oldest is not None:
            reference = max(reference, oldest)
        stalled_for = now - reference
        if stalled_for > ctx.stall_timeout_s:
            return False, f"the engine has not completed a step for {stalled_for:.1f} s with work queued"
    return True, "ok"


def build_app(
    llm: LLM, served_model_name: str, *, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
) -> FastAPI:
    """Build the OpenAI-compatible app serving ``llm`` as ``served_model_name``.

    Every request shares ``llm`` (its engine batches them in flight); the caller owns
    ``llm`` and shuts it down after the server stops.
    """
    ctx = ServingContext(llm, served_model_name, stall_timeout_s)
    app = FastAPI(title="rtllm OpenAI-compatible server", version=rtllm.__version__)
    app.state.ctx = ctx

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        if exc.status < 500:
            ctx.metrics.rejected.inc()
            logger.info("rejected request (%d): %s", exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = OpenAIError(str(exc.detail), status=exc.status_code, type=kind)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while handling a request")
        error = OpenAIError(f"internal server error: {type(exc).__name__}: {exc}", status=500,
                            type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(request, ctx)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(request, ctx)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = ModelCard(id=served_model_name, root=llm.model_path, max_model_len=ctx.max_seq_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.get("/health")
    async def health() -> JSONResponse:
        healthy, reason = engine_health(ctx)
        if healthy:
            return JSONResponse({"status": "ok"})
        logger.warning("health check failed: %s", reason)
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": rtllm.__version__})

    return app
