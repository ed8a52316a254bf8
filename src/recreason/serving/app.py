"""FastAPI application: ``recreason serve --run RUN``. OpenAPI schema at /docs and /openapi.json."""

from __future__ import annotations

import hmac
import time
from pathlib import Path
import logging
import uuid
from typing import Annotated, Literal, Sequence

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from recreason.errors import UnknownId
from recreason.inference.predictor import (MAX_FEATURE_CHARS, MAX_HISTORY, MAX_HISTORY_CHARS, MAX_ID_CHARS,
                                           MAX_ITEM_FEATURES)
from recreason.serving.batching import Overloaded
from recreason.serving.service import ExplanationService

log = logging.getLogger("recreason.serving")

MAX_ID = MAX_ID_CHARS
MAX_TEXT = MAX_HISTORY_CHARS
MAX_FEATURE = MAX_FEATURE_CHARS  # characters of one caller-given item feature
MAX_FEATURES = MAX_ITEM_FEATURES


class Strict(BaseModel):
    """Request bodies: unknown fields and type coercion ("5" for 5, 0 for false) are rejected."""

    model_config = ConfigDict(extra="forbid", strict=True)


class HistoryEntry(Strict):
    item_id: str = Field(min_length=1, max_length=MAX_ID)
    rating: float = Field(ge=0, le=10)
    text: str = Field(min_length=1, max_length=MAX_TEXT)


class ExplainItem(Strict):
    user_id: str = Field(min_length=1, max_length=MAX_ID)
    item_id: str = Field(min_length=1, max_length=MAX_ID)
    history: list[HistoryEntry] | None = Field(None, max_length=MAX_HISTORY, description="for users unknown to the model")
    item_features: list[Annotated[str, Field(min_length=1, max_length=MAX_FEATURE)]] | None = Field(
        None, max_length=MAX_FEATURES, description="for items unknown to the model (quoted in the prompt as data)")


class Options(Strict):
    max_new_tokens: int | None = Field(None, ge=1, le=256)
    decoding: Literal["greedy", "beam", "sample"] = "greedy"
    num_beams: int | None = Field(None, ge=1, le=8)
    temperature: float | None = Field(None, ge=0.05, le=5)
    top_p: float | None = Field(None, ge=0.05, le=1)

    def generation(self) -> dict:
        out = {"max_new_tokens": self.max_new_tokens}
        if self.decoding == "beam":
            out["num_beams"] = self.num_beams or 4
        if self.decoding == "sample":
            out.update(do_sample=True, temperature=self.temperature or 1.0, top_p=self.top_p or 1.0)
        return out


class ExplainRequest(Strict):
    items: list[ExplainItem] = Field(min_length=1, max_length=64)
    options: Options = Options()


class Explanation(BaseModel):
    user_id: str
    item_id: str
    reason: str
    predicted_rating: float | None
    interest: str | None
    features: list[str]
    flags: list[str]
    precomputed: bool = Field(False, description="read from the store (serve --reasons), not generated now")


class ExplainResponse(BaseModel):
    explanations: list[Explanation]


class RecommendRequest(Strict):
    user_id: str = Field(min_length=1, max_length=MAX_ID)
    k: int = Field(10, ge=1, le=100)
    exclude_seen: bool = True
    options: Options = Options()


class Recommendation(Explanation):
    score: float
    title: str = Field("", description="the item's title from the data's item table, empty when it has none")


class RecommendResponse(BaseModel):
    user_id: str
    recommendations: list[Recommendation]


class InteractionRequest(Strict):
    user_id: str = Field(min_length=1, max_length=MAX_ID)
    item_id: str = Field(min_length=1, max_length=MAX_ID)
    rating: float = Field(ge=1, le=5)
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    timestamp: int = Field(ge=0, le=10**11)
    summary: str = Field("", max_length=500)


class InteractionResponse(BaseModel):
    user_id: str
    item_id: str
    features: list[str]
    history_version: int


class HistoryItem(BaseModel):
    item_id: str
    title: str = ""
    rating: float
    text: str
    timestamp: int


class HistoryResponse(BaseModel):
    user_id: str
    history: list[HistoryItem]


class UsersResponse(BaseModel):
    users: list[str]


class Metrics:
    """Prometheus counters and histograms in the service's own registry."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("recreason_requests_total", "HTTP requests", ["path", "status"], registry=self.registry)
        self.latency = Histogram("recreason_request_seconds", "request latency", ["path"], registry=self.registry)
        self.batch = Histogram("recreason_batch_size", "generation batch sizes", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.tokens = Counter("recreason_generated_tokens_total", "generated tokens", registry=self.registry)
        self.reasons = Counter("recreason_reasons_total", "reasons returned", ["outcome"], registry=self.registry)
        self.busy = Counter("recreason_generation_seconds_total", "seconds the model spent generating (its share of "
                            "wall time: how busy the batcher kept it)", registry=self.registry)


class Problem(BaseModel):
    detail: str


ERRORS = {401: {"model": Problem, "description": "missing or invalid API key"},
          404: {"model": Problem, "description": "unknown user or item id (the message names the field)"},
          413: {"model": Problem, "description": "request body too large"},
          503: {"model": Problem, "description": "too many generations waiting; retry after Retry-After seconds"},
          504: {"model": Problem, "description": "the reasons took longer than the request timeout"}}


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """The host of a Host header, without its port, lower-cased: ``[::1]:8000`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


class HostCheck:
    """ASGI middleware: answers 400 to a Host header outside ``allowed`` ("*": any). A server on loopback with no
    API key is otherwise open to DNS rebinding: a web page the user visits can point its own name at 127.0.0.1
    and read histories or write interactions through the user's browser."""

    def __init__(self, app, allowed):
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.allowed:
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.allowed:
                response = JSONResponse({"detail": f"Host {header[:100]!r} is not served here (--allowed-hosts)"},
                                        status_code=400)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: reads the request body up to ``max_bytes`` before the app sees it, so a chunked upload
    without Content-Length gets the same 413 as one that announces its size."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                response = JSONResponse({"detail": f"request body larger than {self.max_bytes} bytes"}, status_code=413)
                return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def key_accepted(headers, api_keys: set[str] | None) -> bool:
    """Whether ``headers`` (a Starlette ``Headers``) carry a bearer token or X-API-Key among ``api_keys`` (none:
    every request is accepted)."""
    if not api_keys:
        return True
    header = headers.get("authorization", "")
    key = header[7:] if header.lower().startswith("bearer ") else headers.get("x-api-key", "")
    given = key.encode("utf-8", "surrogateescape")  # bytes: any header value compares, none raises
    return any(hmac.compare_digest(given, k.encode("utf-8")) for k in api_keys)


def _authorizer(api_keys: set[str] | None):
    """The dependency every protected route takes: a bearer token or X-API-Key among ``api_keys`` (none: open)."""

    async def authorize(request: Request) -> None:  # async: no thread hop
        if not key_accepted(request.headers, api_keys):
            raise HTTPException(status_code=401, detail="missing or invalid API key")

    return authorize


def request_items(body: ExplainRequest) -> list[dict]:
    """The service's view of a validated POST /v1/explanations body: one plain dict per item."""
    items = [i.model_dump() for i in body.items]
    for item in items:
        if item["history"]:
            item["history"] = [dict(h) for h in item["history"]]
    return items


def record_outcomes(metrics: Metrics, explanations: list[dict]) -> None:
    for e in explanations:
        outcome = "filtered" if any(f in ("profanity", "personal_data", "not_a_reason") for f in e["flags"]) else \
            ("ungrounded" if "ungrounded" in e["flags"] else "ok")
        metrics.reasons.labels(outcome).inc()


class StoredAnswers:
    """ASGI middleware, the front door of a server holding precomputed reasons (``serve --reasons``): a POST
    /v1/explanations whose every item is a plain request of a stored pair is answered from the store here, without
    the routing, dependency and thread machinery a generated reason needs (about three quarters of a stored
    answer's time). It takes the same key check and the same request model as the route; anything else (a wrong
    key, an invalid body, options, a pair not stored) goes on to the route unchanged, which answers as always."""

    PATH = "/v1/explanations"

    def __init__(self, app, service: ExplanationService, api_keys: set[str] | None, metrics: Metrics):
        self.app, self.service, self.api_keys, self.metrics = app, service, api_keys, metrics
        self.route = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.PATH \
                or not self.service.has_stored:
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        message = await receive()  # BodyLimit (outside) has read the whole body: one message
        body = message.get("body", b"")
        answer = None
        if message["type"] == "http.request" and not message.get("more_body") and \
                key_accepted(Headers(scope=scope), self.api_keys):
            try:
                request = ExplainRequest.model_validate_json(body)
            except ValueError:
                request = None
            if request is not None:
                answer = self.service.stored_only(request_items(request), request.options.generation())
        if answer is None:
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return message
                return await receive()

            return await self.app(scope, replay, send)
        record_outcomes(self.metrics, answer)
        scope["route"] = self.route or next(r for r in scope["app"].routes if getattr(r, "path", None) == self.PATH)
        self.route = scope["route"]
        payload = ExplainResponse.model_validate({"explanations": answer}).model_dump_json().encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


class RequestMiddleware:
    """ASGI middleware: a request id on every answer (the caller's X-Request-ID when it is sane), the declared body
    limit (413), no stack trace in any answer (500 naming the request id, the trace in the log) and request
    metrics. Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which costs a stored answer about a tenth
    of its time."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if given.isascii() and given.replace("-", "").isalnum() and len(given) <= 64 \
            else uuid.uuid4().hex
        status, started = [500], [False]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        length = headers.get(b"content-length", b"").decode("latin-1") if b"content-length" in headers else None
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await JSONResponse({"detail": f"request body larger than {self.max_body_bytes} bytes"},
                               status_code=413)(scope, receive, send_with_id)
        else:
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:  # noqa: BLE001 - never leak a stack trace; log it with the request id
                log.exception("request %s %s failed (request id %s)", scope.get("method"), scope.get("path"),
                              request_id)
                if started[0]:
                    raise
                await JSONResponse({"detail": f"internal error (request id {request_id})"},
                                   status_code=500)(scope, receive, send_with_id)
        if status[0] >= 500:
            log.error("%s %s answered %d (request id %s)", scope.get("method"), scope.get("path"), status[0],
                      request_id)
        path = scope["route"].path if scope.get("route") is not None else "other"
        self.metrics.requests.labels(path, str(status[0])).inc()
        self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def _error_handlers(app: FastAPI) -> None:
    """Overload (503), timeout (504), invalid input (422 naming the field), unknown ids (404)."""

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        return JSONResponse({"detail": f"the server is busy: {exc}"}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(TimeoutError)
    async def timed_out(request: Request, exc: TimeoutError):
        return JSONResponse({"detail": "the reasons took longer than the request timeout; retry later"},
                            status_code=504)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = [{"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": e["msg"]}
                    for e in exc.errors()]
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(UnknownId)
    async def unknown(request: Request, exc: UnknownId):
        return JSONResponse({"detail": str(exc)}, status_code=404)


def _reason_routes(app: FastAPI, service: ExplanationService, authorize, metrics: Metrics) -> None:
    """POST /v1/explanations, /v1/recommendations and /v1/interactions."""

    @app.post("/v1/explanations", response_model=ExplainResponse, dependencies=[Depends(authorize)],
              responses=ERRORS)
    async def explanations(body: ExplainRequest):
        # all-stored requests were answered by StoredAnswers before routing; this one needs the model (or the
        # service's mix of stored and generated reasons)
        result = await run_in_threadpool(service.explain, request_items(body), body.options.generation())
        record_outcomes(metrics, result)
        return {"explanations": result}

    @app.post("/v1/recommendations", response_model=RecommendResponse, dependencies=[Depends(authorize)],
              responses=ERRORS)
    def recommendations(body: RecommendRequest):
        result = service.recommend(body.user_id, body.k, body.exclude_seen, body.options.generation())
        record_outcomes(metrics, result)
        return {"user_id": body.user_id, "recommendations": result}

    @app.get("/v1/recommendations", response_model=RecommendResponse, dependencies=[Depends(authorize)],
             responses=ERRORS)
    def recommendations_get(user_id: str = Query(..., min_length=1, max_length=MAX_ID),
                            k: int = Query(10, ge=1, le=100)):
        """The user's top ``k`` with default decoding: a precomputed list when the store holds one."""
        result = service.recommend(user_id, k, True, None)
        record_outcomes(metrics, result)
        return {"user_id": user_id, "recommendations": result}

    @app.post("/v1/interactions", response_model=InteractionResponse, dependencies=[Depends(authorize)],
              responses=ERRORS)
    def interactions(body: InteractionRequest):
        return service.record(body.user_id, body.item_id, body.rating, body.text, body.timestamp, body.summary)


def _user_routes(app: FastAPI, service: ExplanationService, authorize) -> None:
    """GET /v1/users and a user's history."""

    @app.get("/v1/users/{user_id}/history", response_model=HistoryResponse, dependencies=[Depends(authorize)],
             responses=ERRORS)
    def history(user_id: str, limit: int = Query(10, ge=1, le=100)):
        """The user's latest interactions, newest first (training history and what was recorded since)."""
        if len(user_id) > MAX_ID:
            raise HTTPException(status_code=422, detail=f"user_id: longer than {MAX_ID} characters")
        return {"user_id": user_id, "history": service.history(user_id, limit)}

    @app.get("/v1/users", response_model=UsersResponse, dependencies=[Depends(authorize)], responses=ERRORS)
    def users(limit: int = Query(100, ge=1, le=1000)):
        """Known user ids, most active first (for pickers)."""
        return {"users": service.active_users(limit)}


def _page_and_operations(app: FastAPI, service: ExplanationService, authorize, metrics: Metrics,
                         public_metrics: bool) -> None:
    """The web page, /healthz and /metrics."""
    seen_batches = [0]
    seen_tokens = [0]
    seen_busy = [0.0]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        """The demo page: pick a user, see history and top-K with reasons, record an interaction."""
        return HTMLResponse((Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "model": service.model_tag}  # a digest: which model, not where it lives

    @app.get("/metrics", response_class=PlainTextResponse,
             dependencies=[] if public_metrics else [Depends(authorize)])
    def prometheus():
        from prometheus_client import generate_latest

        for size in service.batch_sizes[seen_batches[0]:]:
            metrics.batch.observe(size)
        seen_batches[0] = len(service.batch_sizes)
        metrics.tokens.inc(service.stats["generated_tokens"] - seen_tokens[0])
        seen_tokens[0] = service.stats["generated_tokens"]
        busy = service.batcher.busy_s
        metrics.busy.inc(busy - seen_busy[0])
        seen_busy[0] = busy
        return PlainTextResponse(generate_latest(metrics.registry).decode())


def create_app(service: ExplanationService, api_keys: set[str] | None = None, max_body_bytes: int = 1_000_000,
               public_metrics: bool = True, allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The HTTP API over ``service``. ``public_metrics``: /metrics answers without an API key (for a Prometheus
    scraper inside the network); False puts it behind the keys like every other endpoint. ``allowed_hosts``:
    the Host headers answered (``recreason serve``: the loopback names by default); None: any."""
    app = FastAPI(title="recreason", version="0.1.0",
                  description="Personalized, grounded reasons for recommendations.")
    metrics = Metrics()
    app.add_middleware(StoredAnswers, service=service, api_keys=api_keys, metrics=metrics)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)
    authorize = _authorizer(api_keys)
    app.add_middleware(RequestMiddleware, metrics=metrics, max_body_bytes=max_body_bytes)
    _error_handlers(app)
    _reason_routes(app, service, authorize, metrics)
    _user_routes(app, service, authorize)
    _page_and_operations(app, service, authorize, metrics, public_metrics)
    return app


def app_from_environment() -> FastAPI:
    """Factory for uvicorn workers: settings come from ``RECREASON_SERVE`` (written by ``recreason serve``)."""
    import json
    import os

    from recreason.config import GenerateConfig, ServeConfig

    settings = json.loads(os.environ["RECREASON_SERVE"])
    keys = None
    if settings.get("api_key_file"):
        keys = {x.strip() for x in Path(settings["api_key_file"]).read_text().splitlines() if x.strip()}
    service = ExplanationService(settings["run"], settings.get("store"), GenerateConfig(**settings["generate"]),
                                 ServeConfig(**settings["serve"]))
    return create_app(service, keys, public_metrics=not settings.get("private_metrics", False),
                      allowed_hosts=settings.get("allowed_hosts"))
