"""A real fault on a real socket: an HTTP proxy on loopback in front of an S3 endpoint that, from
a seed, answers 503 SlowDown or resets the connection for a fraction of requests.

The decision for a request is a pure function of (seed, method, path, query, how many times that
same request was seen), so a run is reproducible whatever the order in which processes send
their requests, and a retried request gets a fresh draw. `fail_paths` fails every request whose
path contains one of the strings (a video that stays unreachable). Every request is counted.
Nothing in the client is patched: boto3 in the driver and in every Ray worker talks to this
proxy as it would to S3.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0, rate: float = 0.0, fail_paths: tuple[str, ...] = ()) -> None:
        self.upstream = urlsplit(upstream)
        self.seed, self.rate, self.fail_paths = seed, rate, tuple(fail_paths)
        self.seen: dict[str, int] = {}
        self.faults = {"503": 0, "reset": 0}
        self.requests = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                verdict = proxy.decide(self.command, self.path)
                if verdict == "reset":
                    # RST instead of FIN: the client sees "connection reset by peer" mid-request.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if verdict == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(b"" if self.command == "HEAD" else SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # HEAD carries the object's length without its body.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def decide(self, method: str, path: str) -> str | None:
        """None (pass through), "503" or "reset"."""
        key = f"{method} {path}"
        with self._lock:
            self.requests += 1
            n = self.seen.get(key, 0)
            self.seen[key] = n + 1
            verdict = None
            if any(p in path for p in self.fail_paths):
                verdict = "503"
            else:
                h = hashlib.blake2b(f"{self.seed}|{key}|{n}".encode(), digest_size=8).digest()
                u = int.from_bytes(h, "little") / 2**64
                if u < self.rate:
                    verdict = "503" if u < self.rate / 2 else "reset"
            if verdict:
                self.faults[verdict] += 1
            return verdict

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
