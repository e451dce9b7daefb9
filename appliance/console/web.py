"""The console's HTTP side: Starlette routes, Jinja2 templates (autoescaped: topics, client ids and
payloads are text, never markup), sessions and CSRF checks. The pages' logic lives in the modules
they call (store, monitor, actions, trials); this module only checks who asks and renders.

Every state-changing request is a POST that carries the session's CSRF token (a form field, or the
X-CSRF-Token header htmx sends) and, when the browser says where it comes from (Origin), comes
from this console; the session cookie is HttpOnly and SameSite=Strict.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES as GZIP_DEFAULT_EXCLUDED
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance import admin
from appliance.audit.errors import AuditError
from appliance.mqtt.topics import topic_filter_regex
from appliance.audit.results import QueryResult, to_jsonable
from appliance.config import Config, is_loopback
from appliance.console import actions, cookbook, payloads, trials
from appliance.console.download import STAGE_MAX_BYTES, STAGE_RESERVE_BYTES, Download, open_download, sweep_stale
from appliance.console.auth import LoginLimiter, Role, Session, Sessions, Users
from appliance.console.monitor import Monitor, verdict_summary
from appliance.console.store import GROUPS, Store, StoreUnavailable

log = logging.getLogger(__name__)

COOKIE = "console_session"
MAX_FORM = 256 * 1024
SQL_SHOWN_ROWS = 1000
SQL_DOWNLOAD_ROWS = 1_000_000  # docs/console.md, SQL
SQL_DOWNLOAD_TIMEOUT = 300.0  # seconds for a download's query, until its last row is fetched
STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'")


class Denied(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Console:
    """Everything the routes share: config, stores, sessions, templates."""

    def __init__(self, config: Config, *, login: bool, secure: bool):
        self.config = config
        self.state_dir = config.state_dir
        self.login_required = login
        self.secure = secure
        console = config.console
        self.users = Users(config.auth.password_file, console)
        self.sessions = Sessions(console.session_idle)
        self.limiter = LoginLimiter(console.login_attempts, console.login_window)
        self.store = Store(self.state_dir, sync=self._sync)
        # SQL download limits (docs/console.md, SQL): module constants, attributes so tests can lower them.
        self.download_rows = SQL_DOWNLOAD_ROWS
        self.stage_max_bytes = STAGE_MAX_BYTES
        self.stage_reserve_bytes = STAGE_RESERVE_BYTES
        self.monitor = Monitor(self.state_dir, self.store)
        self.trials = trials.Trials(config)
        self.local = Session("local", Role.VIEWER)  # loopback without users: may look, not act
        self.templates = Environment(loader=PackageLoader("appliance.console", "templates"),
                                     autoescape=select_autoescape(default=True, default_for_string=True))
        self.templates.filters["health"] = _health
        self.templates.filters["duration"] = _duration
        self.templates.filters["when"] = _when
        self.templates.filters["bytes"] = _bytes
        self.templates.filters["cell"] = _cell
        self.templates.globals.update(static=_static_url, zip=zip, dict=dict)

    def _sync(self) -> int | None:
        try:
            return int(admin.call(self.state_dir, "audit_sync", timeout=30.0)["last_seq"])
        except admin.AdminUnavailable:
            return None
        except (admin.AdminError, KeyError, TypeError, ValueError) as exc:
            log.warning("audit_sync: %s", exc)
            return None

    # -- who asks ---------------------------------------------------------------------------------

    def session(self, request: Request) -> Session | None:
        if not self.login_required:
            return self.local
        return self.sessions.get(request.cookies.get(COOKIE))

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        session = context.pop("session", None) or self.session(request)
        page = self.templates.get_template(template).render(
            session=session, login_required=self.login_required, path=request.url.path, **context)
        return HTMLResponse(page, status_code=status)


def _static_url(name: str) -> str:
    path = STATIC / name
    try:
        version = int(path.stat().st_mtime)
    except OSError:
        version = 0
    return f"/static/{name}?v={version}"


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def _health(value: Any) -> str:
    return "ok" if value is True else "down" if value is False else "—" if value is None else str(value)


def _duration(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    seconds = round(value)
    return f"{seconds} s" if seconds < 120 else f"{round(seconds / 60)} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    size = float(value)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(value)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return _when(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (dict, list)):
        return json.dumps(to_jsonable(value), ensure_ascii=False)
    return str(value)


async def _form(request: Request) -> dict[str, list[str]]:
    """The urlencoded form of a POST, of at most MAX_FORM bytes: a larger declared length is refused
    before any of it is read, and a body without one (chunked) is read only up to the cap (the
    login form takes this before anyone has logged in)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise Denied(400, "bad Content-Length")
        if int(declared) > MAX_FORM:
            raise Denied(413, "request too large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise Denied(413, "request too large")
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        referer = request.headers.get("referer")
        if referer is None:
            return origin is None  # an "Origin: null" (sandboxed, file:) is never ours
        origin = referer
    parts = urlsplit(origin)
    return parts.netloc == request.headers.get("host", "") and parts.scheme == request.url.scheme


MAX_ID = 2**63 - 1  # decision ids are BIGINT in the audit store


def _id(text: str) -> int | None:
    """A message id: ASCII digits (str.isdigit() also takes "²" and other digits int() refuses)
    within the store's BIGINT range; None otherwise."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _ids(values: list[str]) -> list[int]:
    ids: list[int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if part:
                number = _id(part)
                if number is None:
                    raise Denied(400, f"not a message id: {part[:40]!r}")
                ids.append(number)
    return list(dict.fromkeys(ids))


def build(console: Console) -> Starlette:
    """The ASGI application."""

    def page(handler: Callable[[Request, Session], Awaitable[Response]], *, act: bool = False,
             method: str = "GET") -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = console.session(request)
            if session is None:
                if method == "GET" and "text/html" in request.headers.get("accept", "") \
                        and request.headers.get("hx-request") is None:
                    return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
                return Response("log in first", status_code=401)
            try:
                if method == "POST":
                    if not _same_origin(request):
                        raise Denied(403, "cross-site request refused")
                    form = await _form(request)
                    token = request.headers.get("x-csrf-token") or next(iter(form.get("csrf") or []), None)
                    if not session.csrf_ok(token):
                        raise Denied(403, "missing or wrong CSRF token: reload the page")
                    request.state.form = form
                if act and not session.may_act:
                    raise Denied(403, f"{session.user} is a viewer: only operators may do this")
                return await handler(request, session)
            except Denied as denied:  # htmx swaps it into the page: HTML, escaped
                return HTMLResponse(f'<p class="error" role="alert">{html.escape(str(denied))}</p>',
                                    status_code=denied.status)
            except Exception:  # noqa: BLE001 - logged with its traceback; the browser gets a plain 500
                log.exception("console: %s %s failed", request.method, request.url.path)
                return Response("internal error (see the console's log)", status_code=500, media_type="text/plain")
        return endpoint

    # -- login --------------------------------------------------------------------------------------

    async def login_form(request: Request) -> Response:
        if not console.login_required:
            return RedirectResponse("/", status_code=303)
        return console.render(request, "login.html", next=_next(request.query_params.get("next")), error=None)

    async def login(request: Request) -> Response:
        if not console.login_required:
            return RedirectResponse("/", status_code=303)
        if not _same_origin(request):
            return Response("cross-site request refused", status_code=403)
        try:
            form = await _form(request)
        except Denied as denied:
            return Response(str(denied), status_code=denied.status, media_type="text/plain")
        user = (form.get("user") or [""])[0][:200]
        password = (form.get("password") or [""])[0]
        target = _next((form.get("next") or ["/"])[0])
        address = request.client.host if request.client else "?"
        # Counted before the (slow) password check, taken back if right: concurrent attempts cannot
        # all pass the limit while the first ones are still being checked.
        stamp = console.limiter.reserve(user, address)
        if stamp is None:
            return console.render(request, "login.html", status=429, next=target, session=None,
                                  error="too many failed attempts: wait a few minutes")
        role = await run_in_threadpool(console.users.authenticate, user, password)
        if role is None:
            return console.render(request, "login.html", status=401, next=target, session=None,
                                  error="wrong user name or password, or no console access")
        console.limiter.succeeded(user, address, stamp)
        token, _session = console.sessions.create(user, role)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=console.secure, path="/")
        log.info("console: %s logged in (%s) from %s", user, role, address)
        return response

    async def logout(request: Request, session: Session) -> Response:
        console.sessions.drop(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- overview and verdicts ------------------------------------------------------------------------

    async def overview(request: Request, session: Session) -> Response:
        return console.render(request, "overview.html", overview=console.monitor.overview)

    async def chart(request: Request, session: Session) -> Response:
        return JSONResponse({"points": [list(p) for p in console.monitor.chart]})

    async def events(request: Request, session: Session) -> Response:
        return _stream(console, lambda: [("overview", console.monitor.overview)], lambda event, data: (event, data)
                       if event == "overview" else None)

    async def verdicts(request: Request, session: Session) -> Response:
        return console.render(request, "verdicts.html", filters=_tail_filters(request))

    async def verdict_stream(request: Request, session: Session) -> Response:
        wanted = _tail_filters(request)

        def select(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [row for row in rows if _tail_match(row, wanted)]

        def initial() -> list[tuple[str, Any]]:
            rows = select([verdict_summary(r) for r in console.monitor.tail.recent])[-200:]
            return [("verdicts", rows)]

        def each(event: str, data: Any) -> tuple[str, Any] | None:
            if event != "verdicts":
                return None
            rows = select(data)
            return ("verdicts", rows) if rows else None

        return _stream(console, initial, each)

    async def message(request: Request, session: Session) -> Response:
        raw = request.path_params["decision_id"]
        decision_id = _id(raw)
        if decision_id is None:
            raise Denied(400, "not a message id")
        row = await _read(console.store.decision, decision_id)
        if row is None:
            return console.render(request, "message.html", status=404, row=None, shown=None, wanted=raw)
        schema = await run_in_threadpool(console.trials.schema_for, row["topic"])  # may load the set: files
        reasons = [dict(r) for r in row.get("reasons") or []]
        shown = payloads.show(None if row.get("payload") is None else bytes(row["payload"]), schema, reasons)
        return console.render(request, "message.html", row=row, shown=shown, wanted=raw)

    async def reload(request: Request, session: Session) -> Response:
        try:
            outcome = await run_in_threadpool(actions.reload, console.state_dir, session.user)
        except actions.ActionError as exc:
            outcome = actions.Outcome(problems=[str(exc)])
        log.info("console: %s reloaded the appliance: %s", session.user, outcome.done or outcome.problems)
        return console.render(request, "reload_result.html", outcome=outcome, session=session)

    # -- quarantine ------------------------------------------------------------------------------------

    def _quarantine_filters(params: Any) -> dict[str, str]:
        filters = {key: str(params.get(key) or "").strip()[:500] for key in ("topic", "client", "reason", "group")}
        if filters["group"] not in GROUPS:
            filters["group"] = ""
        return filters

    async def _quarantine_list(filters: dict[str, str]) -> tuple[QueryResult | None, str | None]:
        try:
            result = await _read(lambda: console.store.quarantine(
                topic=filters["topic"] or None, client=filters["client"] or None, reason=filters["reason"] or None,
                group=filters["group"] or None, limit=500))
        except (StoreUnavailable, AuditError) as exc:
            return None, str(exc)
        return result, None

    async def quarantine(request: Request, session: Session) -> Response:
        filters = _quarantine_filters(request.query_params)
        result, error = await _quarantine_list(filters)
        template = "quarantine_list.html" if request.headers.get("hx-request") else "quarantine.html"
        return console.render(request, template, filters=filters, result=result, error=error, outcome=None)

    def quarantine_action(kind: str) -> Callable[[Request, Session], Awaitable[Response]]:
        async def act(request: Request, session: Session) -> Response:
            form = request.state.form
            ids = _ids(form.get("id", []))
            filters = _quarantine_filters({k: (form.get(k) or [""])[0] for k in ("topic", "client", "reason", "group")})
            if not ids:
                outcome = actions.Outcome(problems=["select at least one message"])
            else:
                do = actions.release if kind == "release" else actions.purge
                try:
                    outcome = await run_in_threadpool(do, console.state_dir, console.store, ids, session.user)
                except actions.ActionError as exc:
                    outcome = actions.Outcome(problems=[str(exc)])
                log.info("console: %s %s %d message(s): %s", session.user, kind, len(ids), outcome.done or outcome.problems)
            result, error = await _quarantine_list(filters)
            return console.render(request, "quarantine_list.html", filters=filters, result=result, error=error,
                                  outcome=outcome, session=session)
        return act

    # -- SQL -----------------------------------------------------------------------------------------

    async def sql_page(request: Request, session: Session) -> Response:
        text = request.query_params.get("q", "")
        result, error = None, None
        if text.strip():
            try:
                result = await _read(console.store.sql, text, max_rows=SQL_SHOWN_ROWS)
            except (StoreUnavailable, AuditError) as exc:
                error = str(exc)
        return console.render(request, "sql.html", q=text, result=result, error=error,
                              cookbook=cookbook.queries(), shown_rows=SQL_SHOWN_ROWS, download_rows=SQL_DOWNLOAD_ROWS)

    async def sql_download(request: Request, session: Session) -> Response:
        text = request.query_params.get("q", "")
        fmt = request.query_params.get("format", "csv")
        try:
            download = await _read(open_download, console.store, text, fmt, max_rows=console.download_rows,
                                   timeout=SQL_DOWNLOAD_TIMEOUT, stage_max_bytes=console.stage_max_bytes,
                                   stage_reserve_bytes=console.stage_reserve_bytes)
        except (StoreUnavailable, AuditError) as exc:
            return Response(str(exc), status_code=400, media_type="text/plain")
        headers = {"Content-Disposition": f'attachment; filename="{download.filename}"',
                   "X-Row-Limit": str(console.download_rows)}
        if download.truncated:  # known before the first byte for Parquet only (CSV: see _pieces)
            headers["X-Truncated"] = "true"
        return StreamingResponse(_pieces(download), media_type=download.media_type, headers=headers)

    # -- clients -------------------------------------------------------------------------------------

    async def clients(request: Request, session: Session) -> Response:
        error = None
        rows: list[dict[str, Any]] = []
        try:
            answer = await run_in_threadpool(admin.call, console.state_dir, "clients", timeout=10.0)
            rows = list(answer["clients"])
        except (admin.AdminUnavailable, admin.AdminError) as exc:
            error = str(exc)
        if rows:
            try:
                figures = await _read(console.store.client_figures, sorted({r["client_id"] for r in rows}))
            except (StoreUnavailable, AuditError) as exc:
                figures, error = {}, str(exc)
            for row in rows:
                row.update(figures.get(row["client_id"], {}))
        rows.sort(key=lambda r: (str(r.get("client_id")), str(r.get("peer"))))
        return console.render(request, "clients.html", rows=rows, error=error)

    # -- schema trials ----------------------------------------------------------------------------------

    async def trials_page(request: Request, session: Session) -> Response:
        try:
            revisions = await _read(console.store.revisions)
        except (StoreUnavailable, AuditError):
            revisions = None
        active = await run_in_threadpool(console.trials.active)
        runs = await run_in_threadpool(console.trials.runs)  # polls each run: may read its report
        return console.render(request, "trials.html", active=active, runs=runs,
                              roots=console.trials.roots(), revisions=revisions, diff=None, error=None)

    async def trial_run(request: Request, session: Session) -> Response:
        form = request.state.form
        directory = (form.get("directory") or [""])[0]
        try:
            run = console.trials.start(directory, user=session.user)
        except trials.TrialError as exc:
            return console.render(request, "trial_run.html", status=400, run=None, error=str(exc))
        return console.render(request, "trial_run.html", run=run, error=None)

    async def trial_status(request: Request, session: Session) -> Response:
        # Polled every second while a trial runs: the poll reads the report when it ends and the page
        # reads the progress from the replay's output, both files: off the event loop.
        run = await run_in_threadpool(console.trials.get, request.path_params["run_id"])
        if run is None:
            return Response("no such trial", status_code=404)
        return await run_in_threadpool(console.render, request, "trial_run.html", run=run, error=None, session=session)

    async def trial_diff(request: Request, session: Session) -> Response:
        form = request.state.form
        directory = (form.get("directory") or [""])[0]
        try:
            diff = await run_in_threadpool(console.trials.diff, directory)
        except trials.TrialError as exc:
            return console.render(request, "trial_diff.html", status=400, diff=None, error=str(exc))
        return console.render(request, "trial_diff.html", diff=diff, error=None)

    def get(path: str, handler: Callable[[Request, Session], Awaitable[Response]]) -> Route:
        return Route(path, page(handler), methods=["GET"])

    def post(path: str, handler: Callable[[Request, Session], Awaitable[Response]], *, act: bool) -> Route:
        return Route(path, page(handler, act=act, method="POST"), methods=["POST"])

    routes = [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        post("/logout", logout, act=False),
        get("/", overview),
        post("/reload", reload, act=True),
        get("/api/chart", chart),
        get("/events", events),
        get("/verdicts", verdicts),
        get("/verdicts/stream", verdict_stream),
        get("/messages/{decision_id}", message),
        get("/quarantine", quarantine),
        post("/quarantine/release", quarantine_action("release"), act=True),
        post("/quarantine/purge", quarantine_action("purge"), act=True),
        get("/sql", sql_page),
        get("/sql/download", sql_download),
        get("/clients", clients),
        get("/trials", trials_page),
        post("/trials/run", trial_run, act=True),
        get("/trials/run/{run_id}", trial_status),
        post("/trials/diff", trial_diff, act=False),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for path in await run_in_threadpool(sweep_stale, console.store.scratch_dir()):
            log.info("console: removed %s, a download's staging left by a console that is gone", path)
        task = asyncio.create_task(console.monitor.run(), name="console-monitor")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            console.trials.stop()
            console.store.close()

    # gzip: the vendored scripts are ~100 kB as files, ~40 kB on the wire (event streams are left alone,
    # and Parquet downloads: zstd-compressed already, gzip would only cost the Pi's CPU).
    gzip_excluded = (*GZIP_DEFAULT_EXCLUDED, "application/vnd.apache.parquet")
    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(SecurityHeaders, loopback=is_loopback(console.config.console.listen.host)),
                                 Middleware(GZipMiddleware, minimum_size=1000, exclude_content_types=gzip_excluded)])


class SecurityHeaders:
    """Headers on every answer: a strict Content-Security-Policy (scripts and styles only from
    /static: a payload that got into the page as markup still could not run), no framing, no
    sniffing, no caching of anything but the static files."""

    def __init__(self, app: ASGIApp, *, loopback: bool):
        self.app = app
        self.loopback = loopback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.loopback and not _local_host(Headers(scope=scope).get("host", "")):
            # A console on loopback answers only to loopback names: a page elsewhere whose name
            # was made to resolve to 127.0.0.1 (DNS rebinding) gets nothing.
            await PlainTextResponse("unexpected Host header", status_code=421)(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")
        versioned = static and b"v=" in scope.get("query_string", b"")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = CSP
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "same-origin"
                headers["X-Frame-Options"] = "DENY"
                if versioned:  # the URL changes with the file (static()): keep it for a day
                    headers["Cache-Control"] = "public, max-age=86400"
                elif not static:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, with_headers)


def _local_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback (with or without a port)."""
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return name.lower() == "localhost" or is_loopback(name)


async def _read(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await run_in_threadpool(func, *args, **kwargs)


def _next(target: str | None) -> str:
    """Only a path of this site: an open redirect would carry a fresh session's user elsewhere."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


_TAIL_KEYS = ("topic", "client", "verdict", "reason")


def _tail_filters(request: Request) -> dict[str, str]:
    return {key: str(request.query_params.get(key) or "").strip()[:500] for key in _TAIL_KEYS}


def _tail_match(row: dict[str, Any], wanted: dict[str, str]) -> bool:
    if wanted["topic"] and not re.fullmatch(topic_filter_regex(wanted["topic"]), row["topic"]):
        return False
    if wanted["client"] and wanted["client"] != row["client_id"]:
        return False
    if wanted["verdict"] and wanted["verdict"] != row["verdict"]:
        return False
    reason = wanted["reason"].lower()
    return not reason or reason in row["reason"].lower() or reason in (c.lower() for c in row["checks"])


async def _pieces(download: Download) -> AsyncIterator[bytes]:
    """A download's pieces, each taken in a worker thread when the one before has been sent (the
    server waits for the client to take it: flow control), so one piece is in memory at a time.
    A query failing midway ends the response without its last chunk: the client sees the download
    fail, never a short file that looks whole. The download is closed however the response ends."""
    try:
        while (piece := await run_in_threadpool(download.next_piece)) is not None:
            yield piece
        if download.truncated:
            # A CSV's headers went out before its end was known: exactly X-Row-Limit rows says it.
            log.warning("console: SQL download (%s) cut at the row limit: %d row(s) sent, the result has more",
                        download.filename, download.rows)
    except AuditError as exc:
        log.warning("console: SQL download stopped after %d row(s): %s", download.rows, exc)
        raise
    finally:
        with anyio.CancelScope(shield=True):  # also when the client went away (cancelled)
            await run_in_threadpool(download.close)
        log.debug("console: SQL download: %d row(s) in %d piece(s), the largest %d bytes",
                  download.rows, download.pieces, download.largest_piece)


KEEPALIVE_S = 15.0


def _stream(console: Console, initial: Callable[[], list[tuple[str, Any]]],
            each: Callable[[str, Any], tuple[str, Any] | None]) -> StreamingResponse:
    queue = console.monitor.hub.subscribe()

    async def body() -> AsyncIterator[str]:
        try:
            yield "retry: 3000\n\n"
            for event, data in initial():
                yield _sse(event, data)
            while True:
                try:
                    event, data = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                selected = each(event, data)
                if selected is not None:
                    yield _sse(*selected)
        finally:
            console.monitor.hub.unsubscribe(queue)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _sse(event: str, data: Any) -> str:
    text = json.dumps(to_jsonable(data), ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {text}\n\n"

