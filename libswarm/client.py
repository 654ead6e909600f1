"""SwarmClient: the app's connection to its machine's own swarmd, over the Unix socket."""

from __future__ import annotations

import itertools
import logging
import os
import socket as pysocket
import threading
import time
from typing import TYPE_CHECKING

import zmq

from libswarm.errors import PeerUnavailableError, ProtocolError, SwarmError
from libswarm.paths import closed_directory
from libswarm.protocol import Message, decode, encode
from libswarm.protocol.messages import LOCAL_REPLY_HEADER_BYTES, raise_if_error

if TYPE_CHECKING:  # torch is imported by the calls that carry tensors; swarmctl never needs it
    import torch

DEFAULT_SYSTEM_SOCKET = "/run/swarmd/swarmd.sock"
ROUTED = frozenset({"open", "step", "forward", "backward"})  # requests that wait for a route to the blocks
WAIT_NOTICE_S = 5.0  # a step takes milliseconds; one that waits this long is waiting for a route
WAIT_NOTICE_EVERY_S = 10.0
log = logging.getLogger("libswarm")


def resolve_socket(socket: str | None = None) -> str:
    """--socket / socket=, then $SWARMD_SOCKET, then /run/swarmd/swarmd.sock if it exists,
    then $XDG_RUNTIME_DIR/swarmd.sock."""
    if socket:
        return socket
    env = os.environ.get("SWARMD_SOCKET")
    if env:
        return env
    if os.path.exists(DEFAULT_SYSTEM_SOCKET):
        return DEFAULT_SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    own = os.path.join(runtime, "swarmd.sock") if runtime else None
    if own is not None and os.path.exists(own):
        return own
    closed = closed_directory(DEFAULT_SYSTEM_SOCKET)
    if closed is not None:  # a system swarmd this user may not use (it cannot even see the socket)
        raise SwarmError(_not_in_group(closed))
    if own is not None:
        return own
    raise SwarmError(
        "no swarmd socket found: pass its path (swarmctl --socket PATH; socket= in Python), set $SWARMD_SOCKET, "
        "or start swarmd "
        f"(it listens on {DEFAULT_SYSTEM_SOCKET} by default)"
    )


class SwarmClient:
    """Requests to the local swarmd. Safe to share between threads: each thread has a connection
    of its own (ZeroMQ sockets are not to be shared), so threads' requests run at once, and one
    thread waiting on a slow step or a failover does not hold up the others."""

    def __init__(self, socket: str | None = None, timeout_s: float = 300.0, context: zmq.Context | None = None):
        self.socket_path = resolve_socket(socket)
        self.timeout_s = timeout_s
        self._ctx = context or zmq.Context.instance()
        self._local = threading.local()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards _socks
        self._socks: dict[int, tuple[threading.Thread, zmq.Socket]] = {}  # per thread ident
        self.daemon_protocol = ""  # the protocol version of the daemon's last reply ("" before any)

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            _check_listening(self.socket_path)
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"ipc://{self.socket_path}")
            me = threading.current_thread()
            with self._lock:
                # the connections of threads that ended go with them (a pool's threads come and go)
                for ident, (thread, old) in list(self._socks.items()):
                    if not thread.is_alive():
                        old.close(0)
                        del self._socks[ident]
                self._socks[me.ident or 0] = (me, sock)
            self._local.sock = sock
        return sock

    def request(self, msg_type: str, fields: dict | None = None, tensors: dict[str, torch.Tensor] | None = None,
                timeout_s: float | None = None) -> Message:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        sock = self._socket()
        req_id = next(self._ids)
        sock.send_multipart(encode(msg_type, req_id, fields, tensors), copy=False)
        start = time.monotonic()
        deadline = start + timeout
        notice = start + WAIT_NOTICE_S if msg_type in ROUTED else float("inf")
        while True:
            now = time.monotonic()
            if now >= deadline:
                # the socket may hold a late reply now; start clean next time
                self._reset()
                raise PeerUnavailableError(
                    f"swarmd at {self.socket_path} did not answer {msg_type} in {timeout:g} s"
                )
            if now >= notice:
                self._say_why_waiting(msg_type, now - start)
                notice = time.monotonic() + WAIT_NOTICE_EVERY_S
            if not sock.poll(max(1, int((min(deadline, notice) - now) * 1000)), zmq.POLLIN):
                continue
            try:
                reply = decode(sock.recv_multipart(copy=False), max_header_bytes=LOCAL_REPLY_HEADER_BYTES)
            except ProtocolError as e:
                raise PeerUnavailableError(f"swarmd sent a bad reply: {e}") from None
            # one request at a time on this thread's socket: an error the daemon could not even tie
            # to a request (id 0: it could not read ours) is this request's
            if reply.id == req_id or (reply.id == 0 and reply.type == "error"):
                self.daemon_protocol = reply.version
                return raise_if_error(reply)

    def _say_why_waiting(self, msg_type: str, waited_s: float) -> None:
        """A request that waits for a route (a server gone, a gap in coverage) says so while it
        waits, in the log (logger `libswarm`, a warning: shown without any set-up), with what the
        daemon knows of the gap, instead of only failing once the route timeout has passed. The
        daemon is asked on a connection of its own (status is served apart from routed work)."""
        why = ""
        try:
            with SwarmClient(self.socket_path, timeout_s=2.0, context=self._ctx) as probe:
                cov = probe.status().get("coverage") or []
            missing = cov[0].get("missing", []) if cov else []
            if missing:
                why = "no server holds " + ", ".join(
                    f"blocks {m['blocks'][0]}:{m['blocks'][1]} (for {m['for_s']:.0f} s)" for m in missing) + \
                    f" of {cov[0]['model_id']}; swarmd waits for one up to the route timeout (60 s by default)"
        except SwarmError:
            pass  # the daemon is busy or gone: the request's own timeout will say so
        if why:
            log.warning("%s has waited %.0f s for swarmd: %s", msg_type, waited_s, why)
        else:  # a long training pass, a slow swarm: not news worth a warning
            log.debug("%s has waited %.0f s for swarmd; no gap in coverage", msg_type, waited_s)

    def _reset(self) -> None:
        """Close this thread's connection (the next request opens a fresh one)."""
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            self._local.sock = None
            with self._lock:
                self._socks.pop(threading.get_ident(), None)
            sock.close(0)

    def close(self) -> None:
        """Close every thread's connection; call it when no request is running."""
        with self._lock:
            socks, self._socks = list(self._socks.values()), {}
        for _, sock in socks:
            sock.close(0)
        self._local = threading.local()

    def __enter__(self) -> SwarmClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- typed helpers ---------------------------------------------------------------------
    def status(self) -> dict:
        """The same document as `swarmctl status --json`."""
        return self.request("status", timeout_s=min(self.timeout_s, 30.0)).fields

    def peers(self) -> list[dict]:
        return self.request("peers", timeout_s=min(self.timeout_s, 30.0)).fields["peers"]

    def model_info(self) -> dict:
        return self.request("model_info").fields

    def open_session(self, model_id: str, max_length: int, batch: int, route_timeout_s: float | None = None,
                     push: bool = True, adapter: str | None = None) -> dict:
        """Open an inference session; the gateway waits up to route_timeout_s (default 60) for
        servers to cover every block. push=False makes every hop return through the gateway
        (for measurements)."""
        fields: dict = {"model_id": model_id, "max_length": max_length, "batch": batch}
        if route_timeout_s is not None:
            fields["route_timeout_s"] = route_timeout_s
        if not push:
            fields["push"] = False
        if adapter is not None:
            fields["adapter"] = adapter
        return self.request("open", fields).fields

    def step(self, session: str, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
             key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.step_with_info(session, hidden, position_ids, key_mask)[0]

    def step_with_info(self, session: str, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
                       key_mask: torch.Tensor | None = None, beam_order: torch.Tensor | None = None,
                       start: int | None = None) -> tuple[torch.Tensor, dict]:
        """The step's output and the reply's fields (position, the route now in use).
        `beam_order` [batch]: the cached sequences, reordered before this step (beam search:
        row i continues the sequence that was row beam_order[i]). `start`: the session is cut
        back to this position before the step (drafted tokens that were rejected)."""
        tensors = _inputs(hidden, position_ids, key_mask)
        if beam_order is not None:
            tensors["beam_order"] = beam_order.long()
        fields: dict = {"session": session}
        if start is not None:
            fields["start"] = start
        reply = self.request("step", fields, tensors)
        return _hidden(reply), reply.fields

    def close_session(self, session: str) -> None:
        self.request("close", {"session": session}, timeout_s=min(self.timeout_s, 30.0))

    def forward(self, model_id: str, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, route_timeout_s: float | None = None,
                lora: dict[str, torch.Tensor] | None = None, lora_scaling: float | None = None,
                adapter: str | None = None) -> torch.Tensor:
        """The last block's output for `hidden` (block 0's input), with no cache; `lora`: the
        client's adapters by wire name ([num_layers, ...] each), applied for this call only."""
        return self.forward_with_info(model_id, hidden, position_ids, key_mask, route_timeout_s, lora, lora_scaling,
                                      adapter)[0]

    def forward_with_info(self, model_id: str, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
                          key_mask: torch.Tensor | None = None, route_timeout_s: float | None = None,
                          lora: dict[str, torch.Tensor] | None = None, lora_scaling: float | None = None,
                          adapter: str | None = None, keep: bool = False) -> tuple[torch.Tensor, dict]:
        """`forward`, and the reply's fields. With `keep`, the gateway keeps each hop's input for
        the backward of this pass: give the reply's `pass` to `backward` (which then does not
        run the blocks forward again)."""
        fields: dict = {"model_id": model_id}
        if route_timeout_s is not None:
            fields["route_timeout_s"] = route_timeout_s
        if lora and lora_scaling is not None:
            fields["lora_scaling"] = lora_scaling
        if adapter is not None:
            fields["adapter"] = adapter
        if keep:
            fields["keep"] = True
        reply = self.request("forward", fields, {**_inputs(hidden, position_ids, key_mask), **(lora or {})})
        return _hidden(reply), reply.fields


    def backward(self, model_id: str, hidden: torch.Tensor, grad_output: torch.Tensor,
                 position_ids: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                 route_timeout_s: float | None = None, lora: dict[str, torch.Tensor] | None = None,
                 lora_scaling: float | None = None, pass_id: str | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The gradient w.r.t. `hidden` (the input of block 0) of the block stack's output, given
        the gradient of that output, and the gradients of the LoRA tensors (`grad_<wire name>`).
        Servers recompute the forward inside their blocks; nothing is kept there. `pass_id`: the
        `pass` of a `forward_with_info(keep=True)` of the same inputs, whose hop inputs the
        gateway kept (without it, or once it has expired, the gateway runs the chain forward
        again first)."""
        fields: dict = {"model_id": model_id}
        if route_timeout_s is not None:
            fields["route_timeout_s"] = route_timeout_s
        if pass_id is not None:
            fields["pass"] = pass_id
        if lora and lora_scaling is not None:
            fields["lora_scaling"] = lora_scaling
        reply = self.request("backward", fields, {**_inputs(hidden, position_ids, key_mask),
                                                  "grad_output": grad_output, **(lora or {})})
        return _gradients(reply)

    def backward_kept(self, model_id: str, grad_output: torch.Tensor, pass_id: str,
                      route_timeout_s: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`backward` of the kept forward `pass_id` with its own inputs and trainables, sending
        only the gradient (a daemon of protocol 1.6 or later). A `SessionError` when the daemon
        no longer keeps that pass (expired, or dropped for room): send the whole `backward`."""
        fields: dict = {"model_id": model_id, "pass": pass_id}
        if route_timeout_s is not None:
            fields["route_timeout_s"] = route_timeout_s
        return _gradients(self.request("backward", fields, {"grad_output": grad_output}))


def _gradients(reply: Message) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = reply.tensors.get("grad_input")
    if g is None:
        raise ProtocolError("reply carries no grad_input")
    return g, {k: v for k, v in reply.tensors.items() if k.startswith(("grad_lora_", "grad_deep_prompts"))}


def _check_listening(path: str) -> None:
    """Fail at once, saying why, when nothing can answer at `path` (ZeroMQ would instead wait
    out the whole timeout on a socket file that a killed daemon left behind)."""
    if not os.path.exists(path):
        closed = closed_directory(path)
        if closed is not None:
            raise PeerUnavailableError(_not_in_group(closed))
        raise PeerUnavailableError(f"swarmd is not running: no socket at {path}")
    probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(path)
    except ConnectionRefusedError:
        raise PeerUnavailableError(f"swarmd is not running: nothing listens on {path} (left by a daemon that "
                                   "was killed; start swarmd again)") from None
    except PermissionError:
        raise PeerUnavailableError(f"no permission to use {path}: add this user to the socket's group "
                                   "(swarmd) or run as root") from None
    except OSError as e:
        raise PeerUnavailableError(f"cannot reach swarmd at {path}: {e.strerror or e}") from None
    finally:
        probe.close()


def _not_in_group(directory: str) -> str:
    return (f"permission denied on {directory}: this user may not use swarmd's socket; add it to the group "
            "swarmd (usermod -aG swarmd $USER, then log in again) or run as root")


def _inputs(hidden, position_ids, key_mask) -> dict[str, torch.Tensor]:
    import torch

    t = {"hidden": hidden}
    if position_ids is not None:
        t["position_ids"] = position_ids.to(torch.int64)
    if key_mask is not None:
        t["key_mask"] = key_mask.to(torch.bool)
    return t


def _hidden(reply: Message) -> torch.Tensor:
    h = reply.tensors.get("hidden")
    if h is None:
        raise ProtocolError("reply carries no hidden states")
    return h
