"""A small local web server for judging pairs (stdlib ``http.server``, one thread per request).

Routes: ``GET /`` (the page), ``GET /static/app.js`` and ``/static/style.css``,
and a JSON API:

* ``GET /api/next`` -> ``{"done", "pair": {pair_id, prompt, response_a, response_b} | null, "progress": {judged, total}}``
  (model names are never sent: judging is blind);
* ``POST /api/judge`` with ``{"pair_id", "overall", "helpfulness", "harmlessness", "honesty"}``,
  each choice ``"a" | "b" | "tie"`` -> ``{"ok": true, "progress"}``;
* ``GET /api/results`` -> the ratings report of the judgments made so far.

Defences, since the server holds a database and listens on a socket: it binds
127.0.0.1 unless told otherwise; serves only the three in-memory documents
(anything else, path traversal included, is a JSON 404; there is no directory
listing and nothing is read from disk); accepts only JSON posts
(``Content-Type: application/json``, which a cross-site form cannot send)
of at most ``max_body`` bytes (413 before reading more), with exactly the
expected keys and values (400 otherwise, 409 for a pair already judged); and,
when bound to loopback, answers only requests addressed to a loopback host
name, which defeats DNS rebinding. Every error is ``{"error": "..."}``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from lmlab.eval.compare.page import ASSETS
from lmlab.eval.compare.pairs import Pair
from lmlab.eval.compare.schema import AXES, CRITERIA, MAX_ANNOTATOR_LEN, Judgment, check_choice
from lmlab.eval.compare.store import AlreadyJudged, JudgmentStore, UnknownPair

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 16 * 1024
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

__all__ = ["CompareApp", "CompareServer", "ApiError"]


class ApiError(Exception):
    """An HTTP error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class CompareApp:
    """The judging logic behind the HTTP layer: which pair is next, storing a judgment, the results.

    ``pairs`` are this session's pairs in judging order; ``report`` builds the
    results dict from a list of judgments (default:
    :func:`lmlab.eval.compare.report.build_report` with 1000 bootstrap resamples).
    """

    def __init__(
        self,
        store: JudgmentStore,
        pairs: Sequence[Pair],
        annotator: str = "",
        report: Callable[[list[Judgment]], dict[str, Any]] | None = None,
    ):
        if len(annotator) > MAX_ANNOTATOR_LEN:
            raise ValueError(f"annotator name longer than {MAX_ANNOTATOR_LEN} characters")
        self.store = store
        self.pairs = list(pairs)
        self.by_id = {p.pair_id: p for p in self.pairs}
        self.annotator = annotator
        self.models = sorted({m for p in self.pairs for m in (p.model_a, p.model_b)})
        self._report = report

    def progress(self) -> dict[str, int]:
        """Pairs judged by this annotator out of this session's pairs."""
        done = self.store.judged_ids("web", self.annotator)
        return {"judged": sum(1 for p in self.pairs if p.pair_id in done), "total": len(self.pairs)}

    def next_pair(self) -> dict[str, Any]:
        """The first pair in judging order this annotator has not judged (model names withheld)."""
        done = self.store.judged_ids("web", self.annotator)
        progress = {"judged": sum(1 for p in self.pairs if p.pair_id in done), "total": len(self.pairs)}
        for p in self.pairs:
            if p.pair_id not in done:
                pair = {"pair_id": p.pair_id, "prompt": p.prompt, "response_a": p.response_a, "response_b": p.response_b}
                return {"done": False, "pair": pair, "progress": progress}
        return {"done": True, "pair": None, "progress": progress}

    def judge(self, payload: Any) -> dict[str, Any]:
        """Validate and store one judgment from the page; raises :class:`ApiError` (400/409) on bad input."""
        if not isinstance(payload, dict):
            raise ApiError(400, "expected a JSON object")
        expected = {"pair_id", *CRITERIA}
        unknown = sorted(set(payload) - expected)
        missing = sorted(expected - set(payload))
        if unknown:
            raise ApiError(400, f"unknown fields {unknown}")
        if missing:
            raise ApiError(400, f"missing fields {missing}")
        pid = payload["pair_id"]
        if not isinstance(pid, str) or pid not in self.by_id:
            raise ApiError(400, "unknown pair_id")
        values = {}
        for c in CRITERIA:
            try:
                values[c] = check_choice(payload[c], c, required=True)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
        pair = self.by_id[pid]
        judgment = Judgment(pid, pair.model_a, pair.model_b, values["overall"], *(values[a] for a in AXES),
                            source="web", annotator=self.annotator, created=time.time())
        try:
            self.store.add_judgment(judgment)
        except UnknownPair:
            raise ApiError(400, "unknown pair_id") from None
        except AlreadyJudged:
            raise ApiError(409, "this pair was already judged") from None
        return {"ok": True, "progress": self.progress()}

    def judgments(self) -> list[Judgment]:
        """Web judgments (any annotator) of this session's pairs."""
        return self.store.judgments("web", self.by_id)

    def results(self) -> dict[str, Any]:
        """Ratings of the judgments made so far."""
        judgments = self.judgments()
        if self._report is not None:
            report = self._report(judgments)
        else:
            from lmlab.eval.compare.report import build_report

            report = build_report(judgments, self.models)
        return {**report, "progress": self.progress()}


class _Handler(BaseHTTPRequestHandler):
    server_version = "lmlab-compare"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    @property
    def app(self) -> CompareApp:
        return self.server.app  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ responses

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in _SECURITY_HEADERS.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ dispatch

    def _host_ok(self) -> bool:
        if not self.server.loopback_only:  # type: ignore[attr-defined]
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        if host.startswith("["):  # [::1]:port
            host = host[1:].split("]", 1)[0]
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        return host in _LOOPBACK_NAMES

    def _handle(self, method: str) -> None:
        try:
            if not self._host_ok():
                raise ApiError(403, "requests must be addressed to localhost")
            path = urlsplit(self.path).path
            if method in ("GET", "HEAD"):
                if path in ASSETS:
                    ctype, body = ASSETS[path]
                    self._send(200, body, ctype)
                elif path == "/api/next":
                    self._json(200, self.app.next_pair())
                elif path == "/api/results":
                    self._json(200, self.app.results())
                else:
                    raise ApiError(404, "not found")
            elif method == "POST":
                if path != "/api/judge":
                    raise ApiError(404, "not found")
                self._json(200, self.app.judge(self._read_json()))
            else:
                raise ApiError(405, f"method {method} not allowed")
        except ApiError as e:
            self._error(e.status, e.message)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # a bug must not kill the server or leak a traceback to the page
            log.exception("error handling %s %s", method, self.path)
            self.close_connection = True
            self._error(500, "internal error")

    def _read_json(self) -> Any:
        ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            self.close_connection = True
            raise ApiError(415, "Content-Type must be application/json")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "send a Content-Length, not a chunked body")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self.close_connection = True
            raise ApiError(411, "Content-Length required")
        try:
            length = int(raw_length)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "bad Content-Length") from None
        limit = self.server.max_body  # type: ignore[attr-defined]
        if length > limit:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise ApiError(413, f"body larger than {limit} bytes")
        raw = self.rfile.read(length)
        if len(raw) != length:
            self.close_connection = True
            raise ApiError(400, "truncated body")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ApiError(400, "body is not valid JSON") from None

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._handle("OPTIONS")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CompareServer:
    """Serve a :class:`CompareApp` on ``host:port`` (port 0: any free port; see :attr:`url`)."""

    def __init__(self, app: CompareApp, host: str = "127.0.0.1", port: int = 0, max_body: int = DEFAULT_MAX_BODY):
        server_cls = type("_Server", (ThreadingHTTPServer,), {"daemon_threads": True})
        if ":" in host:
            server_cls.address_family = socket.AF_INET6
        self.httpd = server_cls((host, port), _Handler)
        self.httpd.app = app  # type: ignore[attr-defined]
        self.httpd.max_body = max_body  # type: ignore[attr-defined]
        self.httpd.loopback_only = _is_loopback(host)  # type: ignore[attr-defined]
        self.app = app
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the page."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> "CompareServer":
        """Serve in a background thread; returns self."""
        # a short poll interval makes shutdown() return promptly
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="lmlab-compare", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`shutdown` (or KeyboardInterrupt)."""
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> "CompareServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
