"""A file server on 127.0.0.1 for download tests: byte ranges, and transfers cut off or corrupted on
purpose. Nothing leaves the machine."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RANGE_PREFIX = "bytes="


@dataclass
class Served:
    files: dict[str, bytes]  # URL path -> content
    cut_after: int | None = None  # the next full transfer stops after this many bytes (then it is cleared)
    honour_ranges: bool = True
    requests: list[dict] = field(default_factory=list)  # path and Range header of every request


@contextmanager
def serve(served: Served) -> Iterator[str]:
    """Serves `served` until the block ends; yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.requests.append({"path": self.path, "range": self.headers.get("Range")})
            content = served.files.get(self.path)
            if content is None:
                self.send_error(404)
                return
            start = 0
            wanted = self.headers.get("Range")
            if wanted and served.honour_ranges:
                start = int(wanted.removeprefix(RANGE_PREFIX).split("-")[0])
                if start >= len(content):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            else:
                self.send_response(200)
            body = content[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if served.cut_after is not None:
                body, served.cut_after = body[: served.cut_after], None
                self.close_connection = True
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass  # quiet tests

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
