"""A small HTTP proxy in front of the moto S3 server that injects faults, per request, as the test
sets them while it runs: 503 SlowDown answers, delays, requests that are accepted and never
answered (hang), and answers whose headers and first bytes arrive before the body goes silent
(stall). Hung and stalled connections stay open, silent, until the client gives up or the proxy
stops."""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Faults:
    fail_next: int = 0        # answer this many of the next matching requests with 503 SlowDown
    fail_all: bool = False    # answer every matching request with 503
    hang_next: int = 0        # accept this many of the next matching requests and never answer
    hang_all: bool = False    # never answer a matching request
    stall_next: int = 0       # send this many answers' headers and first `stall_after` bytes, then nothing
    stall_all: bool = False   # stall every matching answer
    stall_after: int = 64 << 10
    # Which requests faults hit: GETs of object data (the part files) by default, so listings and
    # the index pass and the plan is made; True: every request.
    match_all: bool = False
    delay_s: float = 0.0      # sleep before forwarding each request
    failed: int = 0           # how many 503s were sent
    hung: int = 0             # how many requests were left unanswered
    stalled: int = 0          # how many answers stalled mid-body
    forwarded: int = 0
    ranges: list[str] = field(default_factory=list)  # Range headers of the GETs of object data, in order


SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class S3FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.faults = Faults()
        self._lock = threading.Lock()
        self._closing = threading.Event()  # releases hung and stalled handlers at exit
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _go_silent(self) -> None:
                # The connection stays open and says nothing more; the client's timeout must fire.
                self.wfile.flush()
                proxy._closing.wait()
                self.close_connection = True

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._take_fault(self.command, self.path, self.headers.get("range"))
                if fault == "fail":
                    self.send_response(503)
                    self.send_header("content-type", "application/xml")
                    self.send_header("content-length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if fault == "hang":
                    self._go_silent()
                    return
                if proxy.faults.delay_s:
                    time.sleep(proxy.faults.delay_s)
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["host"] = proxy.upstream.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                conn.close()
                self.send_response(reply.status)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                if fault == "stall":
                    self.wfile.write(data[: proxy.faults.stall_after])
                    self._go_silent()
                    return
                self.wfile.write(data)
                with proxy._lock:
                    proxy.faults.forwarded += 1

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # Clients may hold keep-alive connections open past the test; leaving must not wait on them.
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _take_fault(self, method: str, path: str, range_header: str | None) -> str | None:
        """The fault this request gets ("fail", "hang", "stall" or None), counted as it is taken."""
        data = method == "GET" and path.split("?")[0].endswith(".bin")
        f = self.faults
        with self._lock:
            if data:
                f.ranges.append(range_header or "")
            if not (data or f.match_all):
                return None
            if f.fail_all or f.fail_next > 0:
                f.fail_next = max(0, f.fail_next - 1)
                f.failed += 1
                return "fail"
            if f.hang_all or f.hang_next > 0:
                f.hang_next = max(0, f.hang_next - 1)
                f.hung += 1
                return "hang"
            if method == "GET" and (f.stall_all or f.stall_next > 0):
                f.stall_next = max(0, f.stall_next - 1)
                f.stalled += 1
                return "stall"
        return None

    def __enter__(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()
