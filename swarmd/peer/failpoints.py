"""Faults injected for tests, chosen once at start by SWARMD_FAILPOINTS (comma-separated names).
Each wraps one method of the server, so that the serving path of a production daemon holds
no test at all.

- exit_on_replay: the process exits when a gateway replays a session's history to it (a
  server that dies in the middle of a failover);
- hang_on_forward: a forward pass never returns (a wedged device call);
- hang_steps: a step (run alone, batched, or a replay) is computed and its reply never sent
  (a wedged device call or a hostile server that accepts work and stalls it);
- slow_steps: every step (run alone, batched, or a replay) is computed 0.3 s slower (a server
  much slower than its record claims: a lying one, or one whose device is now shared);
- slow_forward: a forward pass takes 3 s longer (a long prefill, a large training batch, a
  slow GPU), so that tests can see what else goes on meanwhile;
- lie_always / lie_sometimes: a step's output (steps and replays) has one element of its last
  position moved by 8 times its row's norm, every time / once in 50 (a lying or faulty server);
- lie_scaled: a step's output (steps and replays) has its last position scaled by 1 +
  SWARMD_LIE_SCALE (0.5 by default): a lie that moves a whole vector by that fraction of its
  norm, sized by a test against the tolerance of the checks;
- reply_nan / reply_wrong_shape / reply_huge: every step's output is NaN / lacks its last
  hidden element / is 1000 times too large after 3 right ones (impossible replies);
- reply_zeros: every step's output is zeros (plausible by norm: small outputs may be honest);
- forward_nan: every forward pass (training) answers NaN;
- lora_grad_nan: every backward pass answers NaN gradients for the client's LoRA weights (its
  gradient of the input is right);
- refuse_opens / refuse_work: every open / every step (not its repeats) and forward pass is
  answered with an error of the code in SWARMD_REFUSE_CODE (`protocol` by default) instead of
  its result (a server that is overloaded, misconfigured, of another version, or hostile);
- reply_no_hidden: every step is answered `ok` without its output tensor (a broken reply);
- push_wrong / push_extra / push_float16 / push_stale: every step's output is returned right to
  the gateway but pushed to the next hop changed: nudged as lie_always does / with one position
  more (a copy of its last) / rounded to float16
  (bfloat16 from a float16 server: the right values in another dtype) / as the
  previous step's output when it has the same shape (the right bytes for another step);
- push_none: every step's output is returned right to the gateway, with `pushed: true`, and
  never pushed (the next hop waits for nothing);
- lose_replies / lose_pushes: from the LOSE_AFTER-th on, one step reply in LOSE_EVERY is lost
  on the way (the step ran, its output is kept and pushed, the gateway never hears back) / one
  push in LOSE_EVERY is lost (the reply says it went): a lossy link, deterministically;
- relay_tap: as a relay, every message it forwards is appended, as it saw it, to the file
  named by SWARMD_RELAY_TAP (what a curious relay could read): its length (8 bytes, little
  endian), then its frames as swarmd.transport.relay.pack lays them out."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("swarmd.peer")

SLOW_FORWARD_S = 3.0
SLOW_STEP_S = 0.3
SLOW_REPLAY_S = 12.0  # past the 10 s a gateway allows a server it has not timed yet


def _exit_on_replay(server) -> None:
    step = server.steps.run_step

    def run_step(s, req, hidden):
        if req.replay:
            log.warning("failpoint exit_on_replay: exiting")
            os._exit(3)
        return step(s, req, hidden)
    server.steps.run_step = run_step


def _slow_replay(server) -> None:
    """Replays (a failover's rebuilt cache) answered SLOW_REPLAY_S late: a replacement alive but
    too slow, which the gateway gives up on while its session is still open here."""
    step = server.steps.run_step

    def run_step(s, req, hidden):
        if req.replay:
            log.warning("failpoint slow_replay: replaying %.0f s late", SLOW_REPLAY_S)
            time.sleep(SLOW_REPLAY_S)
        return step(s, req, hidden)
    server.steps.run_step = run_step


def _hang_on_forward(server) -> None:
    def forward(*args):
        log.warning("failpoint hang_on_forward: this request never returns")
        threading.Event().wait()
    server.passes.forward = forward


def _slow_forward(server) -> None:
    forward = server.passes.forward

    def slow(*args):
        time.sleep(SLOW_FORWARD_S)
        return forward(*args)
    server.passes.forward = slow


LIE_EVERY = 50
HONEST_FIRST = 3  # reply_huge answers right this often first: the gateway learns its norms from them


def _nudge(out):
    out = out.clone()
    row = out[0, -1]
    row[0] += 8 * max(1.0, float(row.float().pow(2).mean().sqrt()))
    return out


def _scale_last(out):
    out = out.clone()
    out[0, -1] *= 1 + float(os.environ.get("SWARMD_LIE_SCALE", "0.5"))
    return out


def _wrong_steps(change: Callable, every: int = 1, after: int = 0) -> Callable:
    """Outputs of this server's steps (runs with a cache: steps and replays), changed by
    `change` once in `every`, after `after` right ones. Installed on the Span class: the daemon
    is a test's process."""
    def install(server) -> None:
        from swarmd.runtime.span import Span

        run, run_steps, count = Span.run, Span.run_steps, [0]

        def changed(out):
            count[0] += 1
            return change(out) if count[0] > after and count[0] % every == 0 else out

        def wrong(self, *args, **kwargs):
            out = run(self, *args, **kwargs)
            return changed(out) if kwargs.get("cache") is not None else out

        def wrong_batch(self, *args, **kwargs):  # decode steps of several sessions run together
            return [changed(out) for out in run_steps(self, *args, **kwargs)]
        Span.run = wrong  # type: ignore[method-assign]
        Span.run_steps = wrong_batch  # type: ignore[method-assign]
    return install


def _forward_nan(server) -> None:
    """Every forward pass answers NaN, whether it keeps its activations or not."""
    forward = server.passes.forward

    def nan(*args):
        fields, tensors = forward(*args)
        return fields, {**tensors, "hidden": tensors["hidden"] * float("nan")}
    server.passes.forward = nan


def _slow_steps(server) -> None:
    """Steps computed SLOW_STEP_S slower, inside the blocks' computation where a slow device is
    slow (decode steps run inline on the socket's thread, so requests behind them wait as they
    would for a slow device)."""
    from swarmd.runtime.span import Span

    run, run_steps = Span.run, Span.run_steps

    def slow(self, *args, **kwargs):
        if kwargs.get("cache") is not None:
            time.sleep(SLOW_STEP_S)
        return run(self, *args, **kwargs)

    def slow_batch(self, *args, **kwargs):
        time.sleep(SLOW_STEP_S)
        return run_steps(self, *args, **kwargs)
    Span.run = slow  # type: ignore[method-assign]
    Span.run_steps = slow_batch  # type: ignore[method-assign]


def _lora_grad_nan(server) -> None:
    from swarmd.runtime.span import Graph

    grad = Graph.grad

    def nan_lora(self, *args, **kwargs):  # a kept pass's backward and a recomputed one alike
        grad_input, lora_grads = grad(self, *args, **kwargs)
        return grad_input, {k: v * float("nan") for k, v in lora_grads.items()}
    Graph.grad = nan_lora  # type: ignore[method-assign]


def _refusal():
    from libswarm.errors import error_from_wire

    code = os.environ.get("SWARMD_REFUSE_CODE", "protocol")
    return error_from_wire(code, f"failpoint: this server refuses with {code!r}")


def _refuse_opens(server) -> None:
    def refuse(msg):
        raise _refusal()
    server.handlers["open"] = refuse


def _finished_steps(change: Callable) -> Callable:
    """Every step's reply (run alone, batched, or a replay) changed by `change(fields, tensors)`."""
    def install(server) -> None:
        finish = server.steps.finish

        def changed(s, msg, out, x):
            return change(*finish(s, msg, out, x))
        server.steps.finish = changed
    return install


def _wrong_pushes(change: Callable) -> Callable:
    """What this server pushes to the next hop changed by `change(out, previous)` (`previous`:
    the output it pushed before, or None); what it returns to the gateway stays right."""
    def install(server) -> None:
        push, previous = server.steps.push, [None]

        def changed(nxt, step, out):
            wrong, previous[0] = change(out, previous[0]), out
            return push(nxt, step, wrong)
        server.steps.push = changed
    return install


def _push_none(server) -> None:
    def claim(nxt, step, out):
        log.warning("failpoint push_none: saying a push went out, sending nothing")
        server.count(pushes_sent=1)  # as it says
        return True
    server.steps.push = claim


LOSE_AFTER = 8  # the first steps of a route go through: the gateway times them first
LOSE_EVERY = 4


def _losing() -> Callable[[], bool]:
    """True for the LOSE_AFTER-th call, then one in LOSE_EVERY."""
    count = [0]

    def lose() -> bool:
        count[0] += 1
        return count[0] >= LOSE_AFTER and (count[0] - LOSE_AFTER) % LOSE_EVERY == 0
    return lose


def _lose_replies(server) -> None:
    on_step, send, lose = server.handlers["step"], server.send, _losing()
    steps: dict[int, None] = {}  # request ids of steps, whichever thread answers them

    def step(req):
        steps[server.current[1]] = None
        while len(steps) > 4096:
            del steps[next(iter(steps))]
        return on_step(req)

    def sent(ident, reply, req_id):
        if steps.pop(req_id, 0) is None and lose():
            log.warning("failpoint lose_replies: the reply to step request %s is lost", req_id)
            return
        send(ident, reply, req_id)
    server.handlers["step"], server.send = step, sent


def _lose_pushes(server) -> None:
    push, lose = server.steps.push, _losing()

    def maybe(nxt, step, out):
        if lose():
            log.warning("failpoint lose_pushes: the push of step %s is lost", step)
            server.count(pushes_sent=1)
            return True
        return push(nxt, step, out)
    server.steps.push = maybe


def _push_extra(out, previous):
    import torch

    return torch.cat([out, out[:, -1:]], dim=1)


def _push_other_dtype(out, previous):
    import torch

    return out.half() if out.dtype != torch.float16 else out.bfloat16()


def _push_stale(out, previous):
    return previous if previous is not None and previous.shape == out.shape else _nudge(out)


def _hang(*args):
    log.warning("failpoint hang_steps: this step is never answered")
    threading.Event().wait()


def _raise_refusal(*args):
    raise _refusal()


def _refuse_work(server) -> None:
    _finished_steps(_raise_refusal)(server)
    server.passes.forward = _raise_refusal


def _relay_tap(server) -> None:
    relay, path = server.relaying.relay, os.environ.get("SWARMD_RELAY_TAP", "relay-tap.bin")

    def tapped(ident, body, sender):
        from swarmd.transport.relay import pack

        blob = pack(body)
        with open(path, "ab") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
        return relay(ident, body, sender)
    server.relaying.relay = tapped


FAILPOINTS: dict[str, Callable] = {"exit_on_replay": _exit_on_replay, "slow_replay": _slow_replay,
                                   "hang_on_forward": _hang_on_forward,
                                   "hang_steps": _finished_steps(_hang), "slow_steps": _slow_steps,
                                   "slow_forward": _slow_forward, "relay_tap": _relay_tap,
                                   "lie_always": _wrong_steps(_nudge), "lie_sometimes": _wrong_steps(_nudge, LIE_EVERY),
                                   "lie_scaled": _wrong_steps(_scale_last),
                                   "reply_nan": _wrong_steps(lambda out: out * float("nan")),
                                   "reply_wrong_shape": _wrong_steps(lambda out: out[..., :-1].contiguous()),
                                   "reply_huge": _wrong_steps(lambda out: out * 1000, after=HONEST_FIRST),
                                   "reply_zeros": _wrong_steps(lambda out: out * 0),
                                   "forward_nan": _forward_nan,
                                   "lora_grad_nan": _lora_grad_nan, "refuse_opens": _refuse_opens,
                                   "refuse_work": _refuse_work,
                                   "reply_no_hidden": _finished_steps(lambda fields, tensors: (fields, {})),
                                   "push_wrong": _wrong_pushes(lambda out, previous: _nudge(out)),
                                   "push_extra": _wrong_pushes(_push_extra), "push_none": _push_none,
                                   "lose_replies": _lose_replies, "lose_pushes": _lose_pushes,
                                   "push_float16": _wrong_pushes(_push_other_dtype),
                                   "push_stale": _wrong_pushes(_push_stale)}


def install(server, names: str) -> None:
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in FAILPOINTS:
            log.warning("SWARMD_FAILPOINTS: unknown failpoint %r ignored (known: %s)", name, ", ".join(FAILPOINTS))
            continue
        log.warning("failpoint %s armed (tests only)", name)
        FAILPOINTS[name](server)
