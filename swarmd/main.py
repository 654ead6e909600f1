"""`swarmd --config PATH`: run the daemon in the foreground, logging to stderr."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from libswarm import __version__
from libswarm.errors import SwarmError


def setup_logging(level: str) -> None:
    # under systemd the journal stamps every line itself; elsewhere we add the time
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)


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
        return 2
    setup_logging(config.log_level)
    threads = os.environ.get("SWARMD_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))

    from swarmd.daemon import Daemon

    stop, wake, hup = threading.Event(), threading.Event(), threading.Event()

    def on_signal(event: threading.Event) -> None:
        event.set()
        wake.set()

    signal.signal(signal.SIGTERM, lambda *_: on_signal(stop))
    signal.signal(signal.SIGINT, lambda *_: on_signal(stop))
    signal.signal(signal.SIGHUP, lambda *_: on_signal(hup))  # re-read seeds and allowed keys
    daemon = None
    try:
        daemon = Daemon(config)
        daemon.start()
    except SwarmError as e:
        logging.getLogger("swarmd").error("%s", e)
        if daemon is not None:
            daemon.stop()
        return 2
    while not stop.is_set():
        wake.wait(1.0)
        wake.clear()
        if hup.is_set():
            hup.clear()
            daemon.reload()
        if not all(t.is_alive() for t in daemon.threads):
            logging.getLogger("swarmd").error("a worker thread died; exiting so that systemd restarts us")
            daemon.stop()
            return 1
    logging.getLogger("swarmd").info("stopping")
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
