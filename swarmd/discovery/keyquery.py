"""Learning a seed's public key when the seed list gives only its address.

CURVE needs the server's key before the first byte, so a daemon answers one tiny UDP
question on the same port number as its TCP peer plane: "SWARMD-KEY? 1 <nonce>" padded to
QUERY_BYTES, answered by "SWARMD-KEY 1 <node id> <nonce>". The asker takes only an answer
from the address it asked (its socket is connected there) that repeats its random nonce, so
nobody who did not see the question can pin a wrong key for a seed. The answer is never
larger than the question (no amplification). A key learnt this way is trusted on first use, like ssh's; pin
keys in the seed list where that matters, and in private swarms the key must also be listed
in peers.d, so a forged answer gains nothing."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from swarmd.identity import is_key

log = logging.getLogger("swarmd.discovery")

QUERY = b"SWARMD-KEY? 1"
QUERY_BYTES = 96  # room for the nonce, and more than the answer with it (70 bytes)
NONCE_HEX = 16
ANSWER_PREFIX = b"SWARMD-KEY 1 "
# queries in flight at once (each a thread: a name may need a blocking DNS lookup first); a
# seed list of hundreds, many of them gone, costs a round a few waits, not one per seed
MAX_QUERIES_AT_ONCE = 128
_TCP = re.compile(r"^tcp://\[?([^\]]+?)\]?:(\d{1,5})$")


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a tcp:// address, or None (a port of any length came from peers' input)."""
    m = _TCP.match(address)
    return (m.group(1), int(m.group(2))) if m and int(m.group(2)) < 65536 else None


class KeyResponder:
    def __init__(self, host: str, port: int, public_key: str):
        self.public_key = public_key
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(("" if host in ("0.0.0.0", "*") else host, port))
        self.sock.settimeout(0.2)

    def serve(self, stop: threading.Event) -> None:
        answer = ANSWER_PREFIX + self.public_key.encode()
        while not stop.is_set():
            try:
                data, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data.startswith(QUERY):
                continue
            parts = data[len(QUERY):].split()
            nonce = parts[0] if parts and re.fullmatch(rb"[0-9a-f]{%d}" % NONCE_HEX, parts[0]) else None
            reply = answer + b" " + nonce if nonce is not None else answer  # no nonce: an older asker
            if len(data) >= len(reply):
                try:
                    self.sock.sendto(reply, peer)
                except OSError:
                    pass
        self.sock.close()


def query_key(address: str, timeout_s: float = 0.5, tries: int = 2) -> str | None:
    """The node id answering at a tcp:// address, or None (no answer, or not a swarmd)."""
    hp = split_address(address)
    if hp is None:
        return None
    try:
        infos = socket.getaddrinfo(hp[0], hp[1], type=socket.SOCK_DGRAM)
    except OSError:
        return None
    family, _, _, _, sockaddr = infos[0]
    nonce = os.urandom(NONCE_HEX // 2).hex().encode()
    question = (QUERY + b" " + nonce).ljust(QUERY_BYTES, b" ")
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout_s / tries)
        try:
            s.connect(sockaddr)  # the kernel then passes on datagrams from that address and port only
        except OSError:
            return None
        deadline = time.monotonic() + timeout_s
        for _ in range(tries):
            try:
                s.send(question)
            except OSError:
                continue
            while time.monotonic() < deadline:
                try:
                    data = s.recv(512)
                except OSError:
                    break
                parts = data[len(ANSWER_PREFIX):].split() if data.startswith(ANSWER_PREFIX) else []
                if len(parts) == 2 and parts[1] == nonce:  # an answer to this question, not a guess
                    key = parts[0].decode(errors="replace")
                    if is_key(key):
                        return key
    return None


def query_keys(addresses: list[str], timeout_s: float = 0.5, tries: int = 2) -> dict[str, str | None]:
    """query_key of each address, all at once (MAX_QUERIES_AT_ONCE in flight)."""
    unique = list(dict.fromkeys(addresses))
    if not unique:
        return {}
    with ThreadPoolExecutor(min(MAX_QUERIES_AT_ONCE, len(unique)), thread_name_prefix="keyquery") as pool:
        return dict(zip(unique, pool.map(lambda a: query_key(a, timeout_s, tries), unique)))
