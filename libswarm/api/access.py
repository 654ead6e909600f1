"""Who may use the API: the bearer keys of api.keys_file and, where there are none, only a Host
header that is an address (an open API must not answer to a rebound name)."""

from __future__ import annotations

import hmac
import os
import threading

from starlette.requests import Request

from libswarm.api.config import host_port
from libswarm.api.errors import ApiError


class Keys:
    """Bearer keys from api.keys_file, one a line (# comments), re-read when the file changes."""

    def __init__(self, path: str | None):
        self.path = path
        self.keys: list[bytes] = []
        self.stamp: tuple | None = None
        self.lock = threading.Lock()
        if path is not None:
            self.current()  # an unreadable file stops swarm-api at start, not at the first request

    def current(self) -> list[bytes]:
        assert self.path is not None
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self.lock:
            if stamp != self.stamp:
                with open(self.path) as f:
                    lines = (line.split("#", 1)[0].strip() for line in f)
                    self.keys = [k.encode() for k in lines if k]
                self.stamp = stamp
            return self.keys

    def check(self, request: Request) -> None:
        if self.path is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            raise ApiError(401, "You didn't provide an API key: send `Authorization: Bearer KEY` (api.keys_file "
                           "holds the keys).", code="invalid_api_key")
        given = auth[7:].strip().encode()
        try:
            keys = self.current()
        except OSError as e:
            raise ApiError(500, f"cannot read the keys file: {e.strerror}", "server_error") from None
        # compare with every key, so the time taken does not tell which one nearly matched
        if not any([hmac.compare_digest(given, k) for k in keys]):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


def check_host(request: Request, keys_file: str | None) -> None:
    """Without keys, only an address may name this server in Host: a page whose own name
    was rebound to 127.0.0.1 (DNS rebinding) would otherwise read and use an open API."""
    if keys_file is not None:
        return
    host = request.headers.get("host", "")
    m = host_port(host)
    name = (m[0] if m else host).strip("[]").lower()
    if not (name == "localhost" or _is_address(name)):
        raise ApiError(421, f"Host {host!r} does not name this server: use its address (an API without "
                       "api.keys_file answers only to addresses)", code="misdirected_request")


def _is_address(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False
