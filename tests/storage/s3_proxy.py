"""A TCP proxy on loopback in front of the test S3 server, whose failures the tests switch on and off.

    with FaultyProxy(s3_server.endpoint_url) as proxy:     # proxy.endpoint_url: give it to the client
        proxy.set("down")      # connections are accepted and closed at once (what a dead server looks like)
        proxy.set("stall")     # connections are accepted and held, unanswered, until the mode changes
        proxy.set("throttle")  # every request is answered 503 SlowDown (S3's throttling)
        proxy.set("deny")      # every request is answered 403 AccessDenied (credentials without permission)
        proxy.set("up")        # forwarded again; connections held by "stall" are closed
        proxy.set_after(12, "down")  # forward 11 more GET requests, then switch on the 12th (and drop it)

Switching away from "up" also cuts the connections in flight, so an upload in progress fails mid-way.
"""

from __future__ import annotations

import selectors
import socket
import socketserver
import threading
from urllib.parse import urlparse

MODES = ("up", "down", "stall", "throttle", "deny")


def _error_response(status: str, code: str, message: str) -> bytes:
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            "</Error>\n").encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head + body


SLOW_DOWN = _error_response("503 Slow Down", "SlowDown", "Reduce your rate")
ACCESS_DENIED = _error_response("403 Forbidden", "AccessDenied", "Access Denied")


class FaultyProxy:
    def __init__(self, target_url: str):
        target = urlparse(target_url)
        self.target = (target.hostname, target.port)
        self.mode = "up"
        self.changed = threading.Condition()
        self.refused = 0  # connections failed by "down", "stall", "throttle" or "deny"
        self.connections = 0  # connections accepted, in any mode
        self._open: set[socket.socket] = set()
        self._switch: tuple[int, str] | None = None  # (GET requests left, mode): see set_after
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._handle(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.set("up")
        self.server.shutdown()
        self.server.server_close()

    def set_after(self, requests: int, mode: str) -> None:
        """Forward `requests` - 1 more GET requests, then switch to `mode` as the next one arrives: an outage at
        a fixed point of a download sequence, however fast the client runs."""
        assert mode in MODES and requests >= 1, (requests, mode)
        with self.changed:
            self._switch = (requests, mode)

    def _count_gets(self, data: bytes) -> bool:
        """Count the GET request lines in data sent by a client; True when a pending set_after fires now."""
        with self.changed:
            if self._switch is None:
                return False
            left = self._switch[0] - data.count(b"GET /")
            if left > 0:
                self._switch = (left, self._switch[1])
                return False
            mode, self._switch = self._switch[1], None
        self.set(mode)
        return True

    def set(self, mode: str) -> None:
        assert mode in MODES, mode
        with self.changed:
            self.mode = mode
            if mode != "up":
                for s in list(self._open):
                    _close(s)
            self.changed.notify_all()

    # -- connections --------------------------------------------------------------------------------

    def _handle(self, client: socket.socket) -> None:
        with self.changed:
            mode = self.mode
            self.connections += 1
            if mode != "up":
                self.refused += 1
        if mode == "down":
            _close(client)
        elif mode == "stall":
            with self.changed:
                self.changed.wait_for(lambda: self.mode != "stall")
            _close(client)
        elif mode in ("throttle", "deny"):
            client.recv(65536)  # the request line and headers
            client.sendall(SLOW_DOWN if mode == "throttle" else ACCESS_DENIED)
            _close(client)
        else:
            self._relay(client)

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            _close(client)
            return
        with self.changed:
            self._open.update((client, upstream))
        # A selector (epoll on Linux), not select.select: a long test session holds more than 1024 file
        # descriptors, and select() cannot watch a descriptor numbered above that.
        sel = selectors.DefaultSelector()
        try:
            sel.register(client, selectors.EVENT_READ)
            sel.register(upstream, selectors.EVENT_READ)
            while client.fileno() >= 0 and upstream.fileno() >= 0:  # set() closes them to cut the relay
                for key, _ in sel.select(timeout=1.0):
                    src = key.fileobj
                    data = src.recv(65536)
                    if not data or (src is client and self._count_gets(data)):
                        return
                    (upstream if src is client else client).sendall(data)
        except (OSError, ValueError):  # cut by set(): the sockets were closed under us
            return
        finally:
            sel.close()
            with self.changed:
                self._open.difference_update((client, upstream))
            _close(client)
            _close(upstream)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
