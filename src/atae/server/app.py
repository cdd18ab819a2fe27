"""The web page and JSON API over a ``Library`` (``atae serve``).

Routes
* ``GET /``: the page (vanilla JS, no CDN); ``/static/*``: its files.
* ``GET /api/search?q=TEXT&k=10[&scorer=adapter|bridge|hybrid][&min_duration=&max_duration=&glob=]`` ->
  ``{"query", "scorer", "results", "took_ms"}``; a scorer this library cannot use -> 400 with the reason
  (``/api/stats`` lists ``scorers``: available ones, the default, and why the others are not).
* ``POST /api/search`` (multipart, field ``file``, optional ``k``): query by an example sound; bodies over
  ``max_upload_bytes`` -> 413 (checked from Content-Length and while streaming), unreadable audio -> 400.
* ``GET /api/audio/{id}``: an indexed file, **only by its numeric id** (no path parameter exists, so no
  traversal); HTTP Range requests answer 206 (Starlette ``FileResponse``) so long files seek.
* ``GET /api/waveform/{id}.png``: a 480x64 waveform thumbnail, cached in ``LIB/cache``.
* ``GET /api/similar/{segment_id}?k=10``: more like this (a result's ``segment_id``): the files nearest
  that segment, its own file left out (``atae.library.similar``); unknown id -> 404, not a number -> 400.
* ``GET /api/stats``.
Results carry ``file_name``, ``folder``, ``missing`` (the file is gone from disk) and, when the tower
has an AudioSet head, ``tags``: the segment's top tags, ``matched`` = carried the query
(``atae.library.explain``).
Every error is JSON ``{"error": message, "fix": hint}`` with a 4xx/5xx status; never a traceback.
"""

from __future__ import annotations

import mimetypes
import os
import tempfile
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from atae.errors import AtaeError, AudioError, LibraryError, ModelError, QueryError
from atae.io import atomic_write_bytes

STATIC = Path(__file__).with_name("static")
MAX_UPLOAD_BYTES = 50 * 1024 * 1024

mimetypes.add_type("audio/flac", ".flac")
mimetypes.add_type("audio/ogg", ".ogg")
mimetypes.add_type("audio/ogg", ".opus")
mimetypes.add_type("audio/aiff", ".aiff")
mimetypes.add_type("audio/aiff", ".aif")


class _TooLarge(Exception):
    pass


def _err(status: int, message: str, fix: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "fix": fix}, status_code=status)


def _atae_status(e: AtaeError) -> int:
    if isinstance(e, (QueryError, AudioError)):
        return 400
    if isinstance(e, ModelError):
        return 409
    if isinstance(e, LibraryError):
        return 503
    return 400


_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (
        b"content-security-policy",
        b"default-src 'self'; media-src 'self' blob:; img-src 'self' data:; style-src 'self'",
    ),
]


class _Guard:
    """Pure ASGI middleware: security headers on every response, and a hard limit on POST bodies
    (Content-Length first, then counted while streaming, so a client that lies or streams chunked
    cannot fill memory or disk)."""

    def __init__(self, app, limit: int | None):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                msg = {**msg, "headers": list(msg.get("headers", [])) + _SECURITY_HEADERS}
            await send(msg)

        if not self.limit or scope["method"] != "POST":
            return await self.app(scope, receive, send_with_headers)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await self._refuse(send_with_headers)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, counted, send_with_headers)
        except _TooLarge:
            if not started:
                await self._refuse(send_with_headers)
        except BaseExceptionGroup as eg:  # raised through a task group
            if eg.subgroup(_TooLarge) is None or started:
                raise
            await self._refuse(send_with_headers)

    async def _refuse(self, send):
        resp = _err(
            413,
            f"upload larger than {self.limit / (1024 * 1024):g} MB",
            "use a shorter example sound (a few seconds is enough)",
        )
        await resp({"type": "http"}, None, send)


def create_app(library, *, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The FastAPI app serving ``library`` (an open ``atae.library.Library``)."""
    app = FastAPI(title="atae", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.library = library
    cache = Path(library.root) / "cache"

    @app.exception_handler(AtaeError)
    async def _atae(request: Request, e: AtaeError):
        msg = str(e)
        if e.fix and msg.endswith(f" (fix: {e.fix})"):
            msg = msg[: -len(f" (fix: {e.fix})")]
        return _err(_atae_status(e), msg, e.fix)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return _err(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        parts = [
            "{}: {}".format(".".join(str(x) for x in err.get("loc", ())[1:]) or "request", err.get("msg"))
            for err in e.errors()
        ]
        return _err(400, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        return _err(500, f"internal error ({type(e).__name__})", "see the server log")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def _k(k) -> int:
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise QueryError(f"k must be an integer, not {k!r}") from None
        if not 1 <= k <= 1000:
            raise QueryError("k must be between 1 and 1000")
        return k

    @app.get("/api/search")
    def search_text(
        q: str = "",
        k: str = "10",
        min_duration: float | None = None,
        max_duration: float | None = None,
        glob: str | None = None,
        scorer: str | None = None,
    ):
        t0 = time.perf_counter()
        from atae.library import scorers as _sc

        name = _sc.canonical(scorer) if scorer else None
        if name is not None:
            why = library.scorers()["unavailable"].get(name)
            if why is not None:
                raise QueryError(f"the {name!r} scorer is not available for this library: {why}")
        res = library.search(
            q, k=_k(k), min_duration=min_duration, max_duration=max_duration, glob=glob or None, scorer=name
        )
        library.explain(res, text=q)
        return {
            "query": q,
            "scorer": name or "adapter",
            "results": [r.to_dict() for r in res],
            "took_ms": round((time.perf_counter() - t0) * 1000, 1),
        }

    @app.post("/api/search")
    async def search_example(request: Request):
        t0 = time.perf_counter()
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return _err(400, "no example sound in the upload", "send multipart form data with a 'file' field")
        k = _k(form.get("k", "10"))
        name = os.path.basename(upload.filename or "upload")
        suffix = os.path.splitext(name)[1][:10]
        fd, tmp = tempfile.mkstemp(prefix="atae-query-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := await upload.read(1 << 20):
                    f.write(chunk)
            from starlette.concurrency import run_in_threadpool

            try:
                res = await run_in_threadpool(library.search, None, audio=tmp, k=k)
            except AudioError as e:
                reason = str(e).replace(tmp + ": ", "").replace(tmp, name)
                if e.fix:
                    reason = reason.replace(f" (fix: {e.fix})", "")
                return _err(
                    400,
                    f"{name} is not a readable audio file: {reason}",
                    "upload a WAV, FLAC, OGG or AIFF sound",
                )
        finally:
            os.unlink(tmp)
        library.explain(res)
        return {
            "query": name,
            "results": [r.to_dict() for r in res],
            "took_ms": round((time.perf_counter() - t0) * 1000, 1),
        }

    def _file(file_id: str):
        if not file_id.isdigit() or len(file_id) > 18:
            return None
        row = library.file(int(file_id))
        if row is None or row.status != "ok":
            return None
        return row

    @app.get("/api/audio/{file_id}")
    def audio(file_id: str):
        row = _file(file_id)
        if row is None:
            return _err(404, f"no indexed sound with id {file_id[:40]!r}")
        if not os.path.isfile(row.path):
            return _err(404, "the file is no longer on disk", "run `atae index` again to update the library")
        media = mimetypes.guess_type(row.path)[0] or "application/octet-stream"
        return FileResponse(
            row.path, media_type=media, content_disposition_type="inline", filename=os.path.basename(row.path)
        )

    @app.get("/api/waveform/{name}")
    def waveform(name: str):
        if not name.endswith(".png"):
            return _err(404, "not found")
        row = _file(name[:-4])
        if row is None:
            return _err(404, f"no indexed sound with id {name[:-4][:40]!r}")
        key = f"wave-{row.id}-{row.size}-{row.mtime_ns}.png"
        p = cache / key
        if p.is_file():
            return Response(
                p.read_bytes(), media_type="image/png", headers={"Cache-Control": "max-age=86400"}
            )
        from atae.server.waveform import file_envelope, render

        try:
            png = render(env=file_envelope(row.path))
        except AudioError:
            return _err(404, "the file can no longer be decoded", "run `atae index` again")
        try:
            atomic_write_bytes(p, png)
        except OSError:
            pass  # read-only library: serve uncached
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    @app.get("/api/similar/{segment_id}")
    def similar(segment_id: str, k: str = "10"):
        t0 = time.perf_counter()
        from atae.library.similar import UnknownSegment, describe

        if not segment_id.isdigit() or len(segment_id) > 18:
            return _err(400, f"a segment id is a whole number, not {segment_id[:40]!r}",
                        "use the segment_id of a search result")
        try:
            like = describe(library, int(segment_id))
            res = library.similar(int(segment_id), k=_k(k))
        except UnknownSegment as e:
            return _err(404, str(e).split(" (fix: ")[0], e.fix)
        return {"like": like, "results": [r.to_dict() for r in res],
                "took_ms": round((time.perf_counter() - t0) * 1000, 1)}

    @app.get("/api/stats")
    def stats():
        s = library.stats()
        s["text_search"] = bool(library.model_version)
        s["scorers"] = library.scorers()
        return s

    app.add_middleware(_Guard, limit=max_upload_bytes)  # outermost user middleware: sees the raw body first
    return app
