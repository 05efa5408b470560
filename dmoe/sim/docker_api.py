"""A small client for the Docker Engine HTTP API over its unix socket (standard library only).

The chaos service and the compose test harness need a handful of calls — list containers by
label, inspect, kill, pause/unpause, stop, start — so this speaks the API directly instead of
pulling in the ``docker`` SDK: one ``http.client`` connection per request over ``AF_UNIX``.
Unversioned paths are used, so the daemon answers with its own default API version; every call
used here has existed unchanged since Docker 1.13 (API 1.25).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any

DEFAULT_SOCKET = "/var/run/docker.sock"


class DockerAPIError(RuntimeError):
    """The daemon answered with an HTTP error (message from its JSON body) or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def socket_from_env(env: dict[str, str] | None = None) -> str:
    """The unix socket path named by ``DOCKER_HOST`` (``unix:///path``), else the default socket."""
    host = (env if env is not None else os.environ).get("DOCKER_HOST", "")
    if not host:
        return DEFAULT_SOCKET
    if not host.startswith("unix://"):
        raise DockerAPIError(f"DOCKER_HOST={host!r}: only unix:// sockets are supported")
    return host[len("unix://") :]


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class ContainerInfo:
    """What chaos needs to know about one container."""

    id: str
    name: str
    state: str  # created | running | paused | restarting | exited | dead
    labels: dict[str, str]

    @property
    def short_id(self) -> str:
        return self.id[:12]


def demultiplex(raw: bytes) -> str:
    """Log bytes of a non-TTY container: frames of an 8-byte header (stream, 0, 0, 0, size) + payload."""
    out, pos = [], 0
    while pos + 8 <= len(raw) and raw[pos] in (0, 1, 2) and raw[pos + 1:pos + 4] == b"\0\0\0":
        size = int.from_bytes(raw[pos + 4:pos + 8], "big")
        out.append(raw[pos + 8:pos + 8 + size])
        pos += 8 + size
    out.append(raw[pos:])  # a TTY container's logs have no frames at all
    return b"".join(out).decode(errors="replace")


class DockerAPI:
    """Blocking Docker Engine API calls; each opens and closes its own connection."""

    def __init__(self, socket_path: str | None = None, *, timeout: float = 60.0) -> None:
        self.socket_path = socket_path or socket_from_env()
        self.timeout = timeout

    def request(
        self, method: str, path: str, *, query: dict[str, Any] | None = None, timeout: float | None = None,
        raw: bool = False,
    ) -> Any:
        """One API call; returns the decoded JSON body (None for empty answers; the bytes with ``raw``)."""
        url = path + ("?" + urllib.parse.urlencode(query) if query else "")
        conn = _UnixConnection(self.socket_path, timeout or self.timeout)
        try:
            conn.request(method, url, headers={"Content-Length": "0"} if method == "POST" else {})
            resp = conn.getresponse()
            body = resp.read()
        except OSError as e:
            raise DockerAPIError(f"cannot reach the Docker daemon at {self.socket_path}: {e}") from e
        finally:
            conn.close()
        if resp.status >= 400:
            try:
                message = json.loads(body).get("message", "")
            except (ValueError, AttributeError):
                message = body.decode(errors="replace")
            raise DockerAPIError(f"{method} {path}: HTTP {resp.status}: {message.strip()}", status=resp.status)
        if raw:
            return body
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except ValueError:
            return body.decode(errors="replace")

    def ping(self) -> bool:
        try:
            return self.request("GET", "/_ping", timeout=5) == "OK"
        except DockerAPIError:
            return False

    def version(self) -> dict[str, Any]:
        return self.request("GET", "/version")

    def containers(self, *, labels: dict[str, str] | None = None, all_states: bool = True) -> list[ContainerInfo]:
        """Containers whose labels match every ``key=value`` given, sorted by name."""
        filters = {"label": [f"{k}={v}" for k, v in (labels or {}).items()]}
        rows = self.request("GET", "/containers/json", query={"all": int(all_states), "filters": json.dumps(filters)})
        found = [
            ContainerInfo(
                id=row["Id"],
                name=(row.get("Names") or ["/" + row["Id"][:12]])[0].lstrip("/"),
                state=row.get("State", ""),
                labels=row.get("Labels") or {},
            )
            for row in rows
        ]
        return sorted(found, key=lambda c: c.name)

    def logs(self, container: str, *, since: float = 0, tail: int | None = None) -> str:
        """stdout+stderr of a container (since unix time ``since``), demultiplexed into plain text."""
        query: dict[str, Any] = {"stdout": 1, "stderr": 1, "since": int(since)}
        if tail is not None:
            query["tail"] = tail
        return demultiplex(self.request("GET", f"/containers/{container}/logs", query=query, raw=True))

    def inspect(self, container: str) -> dict[str, Any]:
        return self.request("GET", f"/containers/{container}/json")

    def state(self, container: str) -> str:
        return self.inspect(container)["State"]["Status"]

    def kill(self, container: str, signal: str = "KILL") -> None:
        self.request("POST", f"/containers/{container}/kill", query={"signal": signal})

    def pause(self, container: str) -> None:
        self.request("POST", f"/containers/{container}/pause")

    def unpause(self, container: str) -> None:
        self.request("POST", f"/containers/{container}/unpause")

    def stop(self, container: str, *, grace_s: int = 10) -> None:
        # The HTTP timeout must outlast the grace period the daemon waits before SIGKILL.
        self.request("POST", f"/containers/{container}/stop", query={"t": grace_s}, timeout=grace_s + self.timeout)

    def start(self, container: str) -> None:
        self.request("POST", f"/containers/{container}/start")

    def networks(self, *, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        filters = {"label": [f"{k}={v}" for k, v in (labels or {}).items()]}
        return self.request("GET", "/networks", query={"filters": json.dumps(filters)})

    def volumes(self, *, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        filters = {"label": [f"{k}={v}" for k, v in (labels or {}).items()]}
        return self.request("GET", "/volumes", query={"filters": json.dumps(filters)}).get("Volumes") or []

    def images(self, reference: str) -> list[dict[str, Any]]:
        return self.request("GET", "/images/json", query={"filters": json.dumps({"reference": [reference]})})
