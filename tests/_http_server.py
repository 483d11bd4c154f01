"""A local HTTP file server for tests: serves bytes by path on 127.0.0.1 with injectable faults.

Faults are queued per path and used one per request, in order:

* ``"500"`` / ``"503"`` / ``"404"``: answer with that status;
* ``"truncate"``: announce the full length but send only half of the body, then close;
* ``"ignore_range"``: answer a Range request with the whole file (status 200).

Range requests (``bytes=N-``) are answered with 206 and a Content-Range header, or 416 when N is
past the end. Every request is logged as (path, Range header or None, status).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        state = self.server.state
        with state.lock:
            queue = state.faults.get(self.path)
            fault = queue.pop(0) if queue else None
            data = state.files.get(self.path)
        rng = self.headers.get("Range")
        if fault in ("500", "503", "404") or data is None:
            code = int(fault) if fault else 404
            state.record(self.path, rng, code)
            self.send_error(code)
            return
        start = 0
        if rng and fault != "ignore_range":
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                state.record(self.path, rng, 416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        code = 206 if start else 200
        state.record(self.path, rng, code)
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if fault == "truncate":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.requests: list[tuple[str, str | None, int]] = []

    def record(self, path: str, rng: str | None, code: int) -> None:
        with self.lock:
            self.requests.append((path, rng, code))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State


class FileServer:
    """``with FileServer() as srv: srv.add("/a/b.tar", data); urlopen(srv.url + "/a/b.tar")``."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = _State()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def state(self) -> _State:
        return self._server.state

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, path: str, data: bytes) -> None:
        """Serve ``data`` at ``path`` (path as sent by the client, query string included)."""
        with self.state.lock:
            self.state.files[path] = data

    def fault(self, path: str, *kinds: str) -> None:
        """Queue faults for the next requests of ``path``."""
        with self.state.lock:
            self.state.faults[path].extend(kinds)

    def requests(self, path: str | None = None) -> list[tuple[str, str | None, int]]:
        with self.state.lock:
            return [r for r in self.state.requests if path is None or r[0] == path]

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
