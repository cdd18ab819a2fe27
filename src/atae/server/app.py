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

Trust: the server answers only requests whose ``Host`` names it (the address it is bound to, the
loopback names, ``--allow-host`` names, or with a wildcard bind any IP literal), so a page on another
site whose name was re-bound to 127.0.0.1 (DNS rebinding) gets 400; and it refuses every request a
browser marks as coming from another origin (``Origin`` not this server, ``Sec-Fetch-Site`` cross-site
or same-site outside a navigation), so no web page can post to it or embed its files (403). Query by
example uses the first 30 s of the upload (``atae.library.querying.EXAMPLE_MAX_S``), decoded and
encoded outside the library lock.
"""

from __future__ import annotations

import ipaddress
import mimetypes
import os
import re
import tempfile
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

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


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARD = ("0.0.0.0", "::", "")
_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also accepts '²' and '١'


def _split_host(value: str) -> tuple[str, str] | None:
    """(host name lower-cased, port or '') of a Host header value, or None if it is malformed."""
    value = value.strip()
    if not value or any(c in value for c in "/@?#\\ ") or not value.isascii():
        return None
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::([0-9]{1,5}))?|([^:\[\]]+)(?::([0-9]{1,5}))?", value)
    if not m:
        return None
    name = (m.group(1) or m.group(3)).lower().rstrip(".")
    return name, m.group(2) or m.group(4) or ""


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Which Host headers name this server: the bound address, the loopback names when bound to
    loopback or everywhere, extra names (``--allow-host``), and any IP literal for a wildcard bind (a
    rebinding page always sends its own *name*, never an IP)."""

    def __init__(self, host: str = "127.0.0.1", allow_hosts=()):
        host = (host or "").strip("[]").lower()
        self.any_ip = host in _WILDCARD
        self.names = {h.strip().strip("[]").lower().rstrip(".") for h in allow_hosts if h.strip()}
        if not self.any_ip:
            self.names.add(host)
        if self.any_ip or host in _LOOPBACK_NAMES or host.startswith("127."):
            self.names.update(_LOOPBACK_NAMES)

    def allows(self, host_header: str | None) -> bool:
        parts = _split_host(host_header or "")
        if parts is None:
            return False
        name = parts[0]
        return name in self.names or (self.any_ip and _is_ip(name))


def _err(status: int, message: str, fix: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "fix": fix}, status_code=status)


def _atae_status(e: AtaeError) -> int:
    from atae.library.similar import UnknownSegment

    if isinstance(e, UnknownSegment):
        return 404
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
    """Pure ASGI middleware, the one place every request passes first: the Host and cross-origin rules
    (see the module docstring; written here rather than with Starlette's TrustedHostMiddleware so the
    refusals are JSON with a fix like every other error, and IP-literal hosts of a wildcard bind work),
    security headers on every response, and a hard limit on POST bodies (Content-Length first, then
    counted while streaming, so a client that lies or streams chunked cannot fill memory or disk)."""

    def __init__(self, app, limit: int | None, hosts: HostPolicy | None = None):
        self.app, self.limit, self.hosts = app, limit, hosts or HostPolicy()

    def _refusal(self, scope) -> JSONResponse | None:
        headers = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        host = headers.get("host")
        if not self.hosts.allows(host):
            return _err(400, f"this server does not answer to the host {host!r}" if host else
                        "the request has no Host header",
                        "open the page by the address the server prints, or start it with --allow-host NAME")
        origin = headers.get("origin")
        if origin is not None:
            o = urlsplit(origin)
            same = o.scheme == scope.get("scheme", "http") and o.netloc.lower() == host.lower()
            if origin == "null" or not same:
                return _err(403, "cross-origin request refused: another web page cannot use this server",
                            "use the search page this server serves")
        site, mode = headers.get("sec-fetch-site"), headers.get("sec-fetch-mode")
        if site in ("cross-site", "same-site") and not (mode == "navigate" and scope["method"] == "GET"):
            return _err(403, "cross-site request refused: another web page cannot use this server",
                        "use the search page this server serves")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await _send_with(refusal, send)
        scope = _without_bad_range(scope)
        started = False
        held: dict | None = None  # an error response that is not JSON yet (Starlette's own, plain text)
        body = b""

        async def send_with_headers(msg):
            nonlocal started, held, body
            if msg["type"] == "http.response.start":
                started = True
                ctype = dict(msg.get("headers", [])).get(b"content-type", b"")
                if msg["status"] >= 400 and not ctype.startswith(b"application/json"):
                    held = msg
                    return
                msg = {**msg, "headers": list(msg.get("headers", [])) + _SECURITY_HEADERS}
            elif held is not None and msg["type"] == "http.response.body":
                body += msg.get("body", b"")
                if msg.get("more_body"):
                    return
                text = body.decode("utf-8", "replace").strip()[:300]
                text = text or HTTPStatus(held["status"]).phrase.lower()
                resp = _err(held["status"], text)
                for k, v in held.get("headers", []):  # e.g. Content-Range of a 416
                    if k.lower() not in (b"content-type", b"content-length"):
                        resp.headers.append(k.decode("latin-1"), v.decode("latin-1"))
                return await _send_with(resp, send)
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


_RANGE = re.compile(r"bytes=\s*(\d*-\d*)(\s*,\s*\d*-\d*)*\s*")


def _without_bad_range(scope):
    """A malformed Range header is ignored (RFC 9110 allows it): the whole file is served."""
    headers = scope.get("headers", [])
    for k, v in headers:
        if k == b"range" and not _RANGE.fullmatch(v.decode("latin-1")):
            return {**scope, "headers": [(a, b) for a, b in headers if a != b"range"]}
    return scope


async def _send_with(resp: JSONResponse, send) -> None:
    async def with_headers(msg):
        if msg["type"] == "http.response.start":
            msg = {**msg, "headers": list(msg.get("headers", [])) + _SECURITY_HEADERS}
        await send(msg)

    await resp({"type": "http"}, None, with_headers)


def create_app(library, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, host: str = "127.0.0.1",
               allow_hosts=()) -> FastAPI:
    """The FastAPI app serving ``library`` (an open ``atae.library.Library``); ``host`` is the address
    it is bound to and ``allow_hosts`` further names it may be reached by (see ``HostPolicy``)."""
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
        res = library.search(q, k=_k(k), min_duration=min_duration, max_duration=max_duration,
                             glob=glob or None, scorer=name, explain=True)
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
        if not _ID.fullmatch(file_id):
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
        from atae.library.similar import describe

        if not _ID.fullmatch(segment_id):
            return _err(400, f"a segment id is a whole number, not {segment_id[:40]!r}",
                        "use the segment_id of a search result")
        like = describe(library, int(segment_id))
        res = library.similar(int(segment_id), k=_k(k))
        return {"like": like, "results": [r.to_dict() for r in res],
                "took_ms": round((time.perf_counter() - t0) * 1000, 1)}

    @app.get("/api/stats")
    def stats():
        s = library.stats()
        s["text_search"] = bool(library.model_version)
        s["scorers"] = library.scorers()
        return s

    # outermost user middleware: sees every request, and the raw body, first
    app.add_middleware(_Guard, limit=max_upload_bytes, hosts=HostPolicy(host, allow_hosts))
    return app
