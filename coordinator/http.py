"""The coordinator's HTTP endpoint: ``/metrics``, ``/status`` and ``/`` on one port.

A deliberately small HTTP/1.1 server on asyncio streams, running in the coordinator's single event
loop next to its DHT node: three read-only GET routes do not justify a web framework, and living in
the same loop means every response is built from the current snapshot without locks or threads.
Each connection serves one request and is closed (``Connection: close``), which Prometheus, browsers
and curl all handle; a client that does not send its request head within ``read_timeout`` seconds
is dropped, so idle sockets cannot pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dmoe.coordinator.bootstrap import CoordinatorStartError
from dmoe.coordinator.page import PAGE_HTML
from dmoe.coordinator.view import SwarmView
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error"}


@dataclass(frozen=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class _BadRequest:
    status: int
    message: str


Route = Callable[[], Response | Awaitable[Response]]


@dataclass(frozen=True)
class QueryRoute:
    """A route that reads the query string (``?a=1&b=2``, decoded; repeated keys: the last one)."""

    handler: Callable[[dict[str, str]], Response]


class HttpServer:
    """Serve ``routes`` (path -> handler) for GET and HEAD."""

    def __init__(self, routes: dict[str, Route | QueryRoute], *, read_timeout: float = 10.0,
                 max_head_bytes: int = 16384) -> None:
        self.routes = routes
        self.read_timeout = read_timeout
        self.max_head_bytes = max_head_bytes
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None

    def bind(self, host: str, port: int) -> tuple[str, int]:
        """Bind the listening socket now (before slower start-up work), so a taken port fails fast.

        Returns (host, bound port); raises CoordinatorStartError with the reason if it cannot bind.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as e:
            reason = os.strerror(e.errno).lower() if e.errno and e.errno > 0 else str(e)
            if e.errno == errno.EADDRINUSE:
                reason += " (another process listens there; choose another --http-port)"
            raise CoordinatorStartError(f"cannot bind HTTP port {host}:{port}: {reason}") from None
        return host, self._sock.getsockname()[1]

    async def start(self) -> None:
        """Serve on the socket from ``bind()``."""
        assert self._sock is not None, "bind() first"
        self._server = await asyncio.start_server(self._serve, sock=self._sock, limit=self.max_head_bytes)

    async def close(self) -> None:
        if self._server is None and self._sock is not None:
            self._sock.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(self._read_head(reader), self.read_timeout)
            except TimeoutError:
                head = _BadRequest(408, "request head not received in time")
            if head is None:
                return  # connected and closed without a request (port probes, health checks)
            if isinstance(head, _BadRequest):
                await self._write(writer, Response(head.status, f"{head.message}\n".encode()), head_only=False)
                return
            method, path, query = head
            await self._write(writer, await self._dispatch(method, path, query), head_only=method == "HEAD")
        except ConnectionError:
            pass  # the client went away; nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str, str] | _BadRequest | None:
        try:
            request_line = (await reader.readline()).decode("latin-1").strip()
            if not request_line:
                return None
            parts = request_line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                return _BadRequest(400, "malformed request line")
            total = len(request_line)
            while True:  # headers: we need none of them, but consume them before answering
                line = await reader.readline()
                total += len(line)
                if total > self.max_head_bytes:
                    return _BadRequest(431, "request head too large")
                if line in (b"\r\n", b"\n", b""):
                    break
        except ValueError:  # a line longer than the stream limit
            return _BadRequest(431, "request head too large")
        method, target = parts[0].upper(), parts[1].split("#", 1)[0]
        path, _, query = target.partition("?")
        return method, path or "/", query

    async def _dispatch(self, method: str, path: str, query: str = "") -> Response:
        if method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD are supported\n")
        route = self.routes.get(path) or self.routes.get(path.rstrip("/") or "/")
        if route is None:
            return Response(404, f"no such page: {path}; try / /status /metrics\n".encode())
        try:
            if isinstance(route, QueryRoute):
                try:
                    fields = dict(urllib.parse.parse_qsl(query, max_num_fields=16))
                except ValueError:
                    return Response(400, b"too many query fields\n")
                return route.handler(fields)
            result = route()
            return await result if asyncio.iscoroutine(result) else result  # type: ignore[return-value]
        except Exception:
            logger.exception("HTTP handler for %s failed", path)
            return Response(500, b"internal error; see the coordinator's log\n")

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, response: Response, *, head_only: bool) -> None:
        head = (
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n"
            + ("Allow: GET, HEAD\r\n" if response.status == 405 else "")
            + "\r\n"
        )
        writer.write(head.encode("latin-1") + (b"" if head_only else response.body))
        await writer.drain()


def coordinator_routes(
    view: SwarmView, registry: CollectorRegistry, *, about: Callable[[], dict[str, Any]]
) -> dict[str, Route | QueryRoute]:
    """``/`` (page), ``/status`` (view as JSON plus ``about()``: who this coordinator is), ``/metrics``."""

    def status() -> Response:
        body = json.dumps({"coordinator": about(), **view.to_json()}, default=str, separators=(",", ":"))
        return Response(200, body.encode(), "application/json")

    return {
        "/": lambda: Response(200, PAGE_HTML.encode(), "text/html; charset=utf-8"),
        "/status": status,
        "/metrics": lambda: Response(200, generate_latest(registry), CONTENT_TYPE_LATEST),
    }
