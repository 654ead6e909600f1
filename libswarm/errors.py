"""The one exception tree of swarm, and its mapping to wire error codes.

    SwarmError                      base; every error libswarm raises
    ├── ConfigError                 a bad config file or option (names the key and the file)
    ├── ProtocolError               a frame that does not parse, a bad header, a version mismatch
    ├── TensorError                 a tensor of the wrong dtype, shape or size
    ├── ModelError                  a missing or unsupported checkpoint
    ├── WrongModelError             a peer serves another model than the one asked for
    ├── NoRouteError                no chain of servers covers every block
    ├── PeerUnavailableError        a peer did not answer in time, or is unreachable
    ├── SessionError                unknown session, a step past max_length, a closed session
    ├── CacheFullError              a session does not fit the KV cache budget
    ├── LimitError                  a request beyond a configured limit (batch, length, bytes)
    ├── AccessDeniedError           an operator command from a caller that is not an operator
    └── RemoteError                 a peer failed while computing (message only, never a traceback)
        └── WrongOutputError        a peer's output failed the gateway's checks (docs/security.md)

Every error crosses the wire as a `code` string and a one-line `message`; `error_from_wire`
rebuilds the same class on the other side, so a `CacheFullError` raised in a server
reaches the app as a `CacheFullError`.
"""

from __future__ import annotations

MAX_MESSAGE_CHARS = 1000  # an error's text, whatever a peer's input it quotes (its reply stays small)


class SwarmError(Exception):
    code = "error"
    # raised while parsing a request whose header was read: its id, so that the error reply
    # answers it (one for id 0 answers nothing the sender waits for)
    req_id = 0
    # the address of the peer whose error reply this is (set by the daemon's peer connections):
    # a peer's refusal may be its own fault, where an error raised here is the request's
    peer: str | None = None
    # with a step's error: the digest of the input the server was given (docs/protocol.md,
    # `consumed`), so that a gateway can tell a refusal of a pushed input it never saw
    consumed: str | None = None

    def __init__(self, message: str):
        # one line: a peer's message may never smuggle a traceback into a log line; and short:
        # an error quoting 64 KiB of a peer's header would not fit in a reply's header itself
        text = " ".join(str(message).split())
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[:MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(text)

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(SwarmError):
    code = "config"


class ProtocolError(SwarmError):
    code = "protocol"


class TensorError(SwarmError):
    code = "tensor"


class ModelError(SwarmError):
    code = "model"


class WrongModelError(SwarmError):
    code = "wrong_model"


class NoRouteError(SwarmError):
    code = "no_route"


class PeerUnavailableError(SwarmError):
    code = "unavailable"


class SessionError(SwarmError):
    code = "session"


class CacheFullError(SwarmError):
    code = "cache_full"


class LimitError(SwarmError):
    code = "limit"


class AccessDeniedError(SwarmError):
    """An operator command (`drain`, `rebalance`) on the local plane from an app's user: see
    swarmd/operators.py."""

    code = "denied"


class RemoteError(SwarmError):
    code = "remote"


class WrongOutputError(RemoteError):
    """A server's output is not what its blocks compute: impossible values, or contradicted by
    two other servers. The gateway distrusts the server and recomputes elsewhere."""

    code = "wrong_output"


class SpanMovedError(SwarmError):
    """The server has moved to other blocks (rebalancing): route around it and try again."""

    code = "moved"


class UnsupportedError(SwarmError, NotImplementedError):
    """Something the swarm cannot do (yet), refused before anything runs: never a silent
    difference from what the whole model would compute."""

    code = "unsupported"


_BY_CODE: dict[str, type[SwarmError]] = {
    cls.code: cls
    for cls in (
        SwarmError,
        ConfigError,
        ProtocolError,
        TensorError,
        ModelError,
        WrongModelError,
        NoRouteError,
        PeerUnavailableError,
        SessionError,
        CacheFullError,
        LimitError,
        AccessDeniedError,
        RemoteError,
        WrongOutputError,
        SpanMovedError,
        UnsupportedError,
    )
}


def error_from_wire(code: str, message: str) -> SwarmError:
    """The exception for an error reply; unknown codes become a plain RemoteError."""
    return _BY_CODE.get(code, RemoteError)(message)


def error_to_wire(exc: BaseException) -> tuple[str, str]:
    """(code, one-line message) for a reply. Unexpected exceptions say only their type and text."""
    if isinstance(exc, SwarmError):
        return exc.code, exc.message
    return RemoteError.code, " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
