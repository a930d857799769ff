"""The HTTP routes (KServe v2 REST, https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/):

    GET  /v2/health/live, /v2/health/ready, /v2            server liveness, readiness, metadata
    GET  /v2/models/{name}[/versions/{v}]                  model metadata (+ the bundle's metadata)
    GET  /v2/models/{name}[/versions/{v}]/ready            model readiness
    POST /v2/models/{name}[/versions/{v}]/infer            inference (JSON or binary_data tensors)
    GET  /metrics                                          Prometheus text

Every error is a JSON {"error": "..."}: 400 a malformed or unusable request, 404 an unknown model, version or
route, 413 a body over the limit, 503 the model's queue full, 504 the request timeout passed. A request never
reaches a traceback; a fault of the server itself is logged with its traceback and answered 500 without it.
Each request is logged as one JSON line on the logger "ssn_edge.serve.access".
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ssn_edge import __version__
from ssn_edge.serve.metrics import Metrics
from ssn_edge.serve.protocol import HEADER_LENGTH, ProtocolError, encode_response, parse_request
from ssn_edge.serve.registry import ModelVersion, NotFound, Registry, ServeOptions
from ssn_edge.serve.scoring import model_metadata, outputs_for, plan_job, run_job
from ssn_edge.serve.worker import Overloaded, TimedOut

log = logging.getLogger("ssn_edge.serve")
access = logging.getLogger("ssn_edge.serve.access")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to pass limit bytes: by its Content-Length, or while read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"request body of {int(declared)} bytes is over the {limit}-byte limit", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"request body is over the {limit}-byte limit", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProtocolError)
    async def protocol_error(_request: Request, exc: ProtocolError):
        return _error(exc.status, str(exc))

    @app.exception_handler(NotFound)
    async def not_found(_request: Request, exc: NotFound):
        return _error(404, str(exc.args[0]))

    @app.exception_handler(Overloaded)
    async def overloaded(_request: Request, exc: Overloaded):
        return _error(503, f"model busy: {exc}")

    @app.exception_handler(TimedOut)
    async def timed_out(_request: Request, exc: TimedOut):
        return _error(504, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        return _error(400, f"invalid request: {exc.errors()[:1]}")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal server error ({type(exc).__name__}); see the server log")


def _install_access_log(app: FastAPI, metrics: Metrics, registry: Registry) -> None:
    @app.middleware("http")
    async def log_request(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        ms = (time.perf_counter() - t0) * 1e3
        model = getattr(request.state, "model", None)
        route = getattr(request.state, "route", "other")
        known = model if model in registry.models else ""  # a label per made-up name would grow without bound
        metrics.requests.labels(route, known, str(response.status_code)).inc()
        access.info(json.dumps({
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "client": request.client.host if request.client else None,
            "method": request.method, "path": request.url.path, "status": response.status_code,
            "ms": round(ms, 3), "bytes_in": int(request.headers.get("content-length") or 0),
            "model": model, "version": getattr(request.state, "version", None),
        }))
        return response


def create_app(registry: Registry, options: ServeOptions = ServeOptions()) -> FastAPI:
    app = FastAPI(title="ssn-edge", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    app.state.registry, app.state.metrics = registry, metrics
    limit = int(options.max_body_mb * 1024 * 1024)
    for name, versions in registry.models.items():
        for v, entry in versions.items():
            metrics.in_flight.labels(name, str(v)).set_function(lambda w=entry.worker: w.pending)
    _install_handlers(app)
    _install_access_log(app, metrics, registry)

    def lookup(request: Request, name: str, version: str | None, route: str) -> ModelVersion:
        request.state.route, request.state.model, request.state.version = route, name, version
        model = registry.get(name, version)
        request.state.version = str(model.version)
        return model

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": bool(registry.models)}

    @app.get("/v2")
    async def server_metadata():
        return {"name": "ssn-edge", "version": __version__, "extensions": ["binary_tensor_data", "image_bytes_input"]}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def metadata(request: Request, name: str, version: str | None = None):
        model = lookup(request, name, version, "metadata")
        return JSONResponse(model_metadata(model, sorted(registry.models[name])))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: Request, name: str, version: str | None = None):
        model = lookup(request, name, version, "ready")
        return {"name": model.name, "version": str(model.version), "ready": True}

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str | None = None):
        model = lookup(request, name, version, "infer")
        t0 = time.perf_counter()
        req = parse_request(await read_body(request, limit), request.headers.get(HEADER_LENGTH))
        job = plan_job(model, req)
        try:
            preds = await model.worker.run(lambda infer_request: run_job(model, job, infer_request), options.timeout_s)
        except ValueError as exc:  # an image the runtime refuses (ImageError): the predict message
            raise ProtocolError(str(exc)) from None
        body, header_length = encode_response(model.name, str(model.version), req.id, outputs_for(job, preds))
        labels = (model.name, str(model.version))
        metrics.latency.labels(*labels).observe(time.perf_counter() - t0)
        for p in preds:
            metrics.decisions.labels(*labels, "defect" if p.decision else "ok").inc()
        if header_length is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

    return app
