"""`swarmd --config PATH`: run the daemon in the foreground, logging to stderr."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import NoReturn

from libswarm import __version__
from libswarm.errors import SwarmError
from swarmd.sdnotify import notify, watchdog_interval_s

STATUS_INTERVAL_S = 5.0  # how often STATUS= is refreshed for `systemctl status`
STOP_DRAIN_MAX_S = 60.0  # on SIGTERM, open sessions get at most this long (below the unit's TimeoutStopSec)


def setup_logging(level: str) -> None:
    # under systemd the journal stamps every line itself; elsewhere we add the time
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)


def root_in_a_users_state_dir(state_dir: str) -> str | None:
    """Why root must not run this daemon: its state_dir belongs to another user (the service's
    user, swarmd), so a run by hand as root would leave there a node key that user cannot read,
    and a socket its group cannot use. None when nothing is wrong."""
    if os.geteuid() != 0:
        return None
    try:
        owner = os.stat(state_dir).st_uid
    except OSError:
        return None  # made by this run, as root's
    if owner == 0:
        return None
    try:
        import pwd

        user = pwd.getpwuid(owner).pw_name
    except KeyError:
        user = str(owner)
    return (f"state_dir {state_dir} belongs to user {user}: run swarmd as that user, not as root "
            f"(`systemctl start swarmd`, or in the foreground `runuser -u {user} -- swarmd --config PATH`); as root "
            "it would leave a node key and a socket there that the service cannot use")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swarmd", description="serve transformer blocks to a swarm")
    parser.add_argument("--config", default="/etc/swarmd/swarmd.yaml", help="path to swarmd.yaml")
    parser.add_argument("--version", action="version", version=f"swarmd {__version__}")
    args = parser.parse_args(argv)

    from swarmd.config import load_config

    try:
        config = load_config(args.config)
    except SwarmError as e:
        print(f"swarmd: {e}", file=sys.stderr)
        notify(f"STATUS=not started: {e}")  # what `systemctl status swarmd` shows the operator
        return 2
    problem = root_in_a_users_state_dir(config.state_dir)
    if problem:
        print(f"swarmd: {problem}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    if config.serve.threads:
        import torch

        torch.set_num_threads(config.serve.threads)

    from swarmd.daemon import Daemon

    stop, wake, hup = threading.Event(), threading.Event(), threading.Event()

    def on_signal(event: threading.Event) -> None:
        event.set()
        wake.set()

    signal.signal(signal.SIGTERM, lambda *_: on_signal(stop))
    signal.signal(signal.SIGINT, lambda *_: on_signal(stop))
    signal.signal(signal.SIGHUP, lambda *_: on_signal(hup))  # re-read seeds and allowed keys
    log = logging.getLogger("swarmd")
    watchdog_s = watchdog_interval_s()
    daemon = None
    try:
        daemon = Daemon(config)
        daemon.start()
    except SwarmError as e:
        log.error("%s", e)
        notify(f"STATUS=failed to start: {e}")
        if daemon is not None:
            daemon.stop()
        return 2
    notify(f"READY=1\nSTATUS={daemon.status_line()}")
    last_status = time.monotonic()
    while not stop.is_set() and not daemon.drain_requested.is_set():
        wake.wait(min(1.0, watchdog_s or 1.0))
        wake.clear()
        if hup.is_set():
            hup.clear()
            notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
            daemon.reload()
            notify(f"READY=1\nSTATUS={daemon.status_line()}")
        if not all(t.is_alive() for t in daemon.threads):
            log.error("a worker thread died; exiting so that systemd restarts us")
            daemon.stop()
            exit_now(1)
        stalled_s = daemon.server.stalled_s() if daemon.server else 0.0
        if stalled_s > config.serve.stall_timeout_s:
            # the serving thread is wedged (a hung CUDA call cannot be interrupted): no more
            # WATCHDOG=1, and exit without joining it, so that systemd restarts a working daemon
            log.error("the serving thread has been stuck in one request for %.0f s (serve.stall_timeout_s: %.0f); "
                      "exiting so that systemd restarts us", stalled_s, config.serve.stall_timeout_s)
            notify(f"STATUS=serving thread stuck for {stalled_s:.0f} s; restarting")
            logging.shutdown()
            os._exit(1)
        if watchdog_s:
            notify("WATCHDOG=1")  # only after checking the worker threads and the serving thread
        if time.monotonic() - last_status >= STATUS_INTERVAL_S:
            notify(f"STATUS={daemon.status_line()}")
            last_status = time.monotonic()
    bound_s = min(config.serve.drain_timeout_s, STOP_DRAIN_MAX_S)
    notify(f"STOPPING=1\nSTATUS=draining: no new sessions; waiting up to {bound_s:.0f} s for open ones")
    n = daemon.open_sessions()
    log.info("draining: no new sessions; waiting up to %.0f s for %d open %s", bound_s, n,
             "session" if n == 1 else "sessions")
    daemon.begin_drain()
    deadline = time.monotonic() + bound_s
    while daemon.open_sessions() and time.monotonic() < deadline:
        time.sleep(0.2)
        if watchdog_s:
            notify("WATCHDOG=1")
    if daemon.open_sessions():
        log.info("drain bound reached with %d sessions open; their gateways fail over", daemon.open_sessions())
    log.info("stopping")
    daemon.stop()
    exit_now(0)


def exit_now(code: int) -> NoReturn:
    """Exit once the daemon has stopped, without the interpreter's own teardown: freeing the
    objects of torch and transformers one by one costs about a CPU second on every stop and
    restart, and nothing is left to flush by then (sockets closed, state written, logs flushed
    here)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
