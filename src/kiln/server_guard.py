"""What keeps `kiln serve` up and private on a hostile network: connection-level limits (header and body read
timeouts, connection cap, TCP_NODELAY) in a uvicorn h11 protocol subclass, a Host-header check against DNS
rebinding, and a scan for strings JSON can carry but UTF-8 cannot (lone surrogates).

uvicorn has a keep-alive idle timeout and `limit_concurrency`, but no timer on reading a request's headers or body
(a client sending one byte a second holds its connection forever) and its concurrency limit only answers 503 once a
request has arrived, so idle connections that never send one pile up. Both are per-connection state, hence the
protocol.
"""

import asyncio
import ipaddress
import json
import socket
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _refusal(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 error response in OpenAI's format, written before any request was read."""
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}}).encode()
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"connection: close\r\n\r\n" + body


def protocol_class(header_timeout: float, body_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An H11Protocol that closes connections whose request headers take longer than header_timeout seconds
    (idle fresh connections included) or whose body takes longer than body_timeout after them, refuses
    connections beyond max_connections with a 503, and sets TCP_NODELAY (without it a response written in two
    parts waits ~40 ms for the client's delayed ACK)."""
    timeouts = {h11.IDLE: header_timeout, h11.SEND_BODY: body_timeout}

    class GuardedH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None
        _timed_state: type | None = None  # what the running timer is waiting on

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self.connections) > max_connections:
                message = f"too many open connections (limit {max_connections}); retry later"
                transport.write(_refusal(503, "Service Unavailable", message, "too_many_connections"))
                transport.close()
                return
            self._time_reading()

        def data_received(self, data: bytes) -> None:
            self._time_reading()  # a new request begins (kept-alive connections too): its headers are timed
            super().data_received(data)
            self._time_reading()  # headers done: the body is timed; request read: no timer

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_read_timer()
            super().connection_lost(exc)

        def _time_reading(self) -> None:
            """One timer per phase of reading a request, started when the phase begins (not on every byte, so
            dripping bytes does not extend it). A body still arriving after an early error reply is timed too."""
            state = self.conn.their_state
            if state is self._timed_state:
                return
            self._stop_read_timer()
            if state in timeouts:
                self._timed_state = state
                self._read_timer = self.loop.call_later(timeouts[state], self._too_slow, state)

        def _stop_read_timer(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer = self._timed_state = None

        def _too_slow(self, state) -> None:
            self._read_timer = self._timed_state = None
            if self.conn.their_state is state and not self.transport.is_closing():
                self.transport.close()  # mid-request the app sees a disconnect, as if the client had gone

    return GuardedH11Protocol


# --- Host header ------------------------------------------------------------------------------------------------


def host_of(header: str) -> str:
    """'Example.COM:8080' -> 'example.com', '[::1]:80' -> '::1' (the name a browser put in the Host header)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Which Host headers to serve. A DNS-rebinding page reaches us under its own domain name, so by default only
    loopback names and the bound address are served; bound to a wildcard address, any IP literal is too (an IP
    cannot be rebound). `allowed` adds names; '*' turns the check off."""

    def __init__(self, bound_host: str, allowed: list[str] | None = None):
        self.anything = "*" in (allowed or [])
        self.names = {*LOOPBACK_HOSTS, host_of(bound_host), *(host_of(a) for a in allowed or [])}
        self.any_ip = bound_host in WILDCARD_HOSTS

    def allows(self, header: str | None) -> bool:
        if self.anything:
            return True
        if not header:
            return False
        name = host_of(header)
        return name in self.names or self.any_ip and _is_ip(name)


# --- request bodies ----------------------------------------------------------------------------------------------


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """The JSON path of the first string (key or value) that UTF-8 cannot encode, or None. JSON's \\ud800 escapes
    parse into such strings; the tokenizer and the response encoder would fail on them later."""
    stack = [(path, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return where or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                name = str(k).encode("utf-8", "backslashreplace").decode()  # the path must be encodable itself
                key = f"{where}.{name}" if where else name
                stack.append((key, k))
                stack.append((key, item))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(v))
    return None
