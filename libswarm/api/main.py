"""`swarm-api --config /etc/swarmd/swarmd.yaml`: serve the OpenAI-compatible API and the swarm
page on api.listen, for the model of that file, through the swarmd at its network.socket."""

from __future__ import annotations

import argparse
import logging
import sys

DEFAULT_CONFIG = "/etc/swarmd/swarmd.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="swarm-api", description=__doc__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"swarmd's config file (default {DEFAULT_CONFIG})")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        from libswarm.api.app import create_app
    except ImportError as e:
        print(f"swarm-api: {e.name} is missing: install the api extra (pip install './swarm[api]' from "
              "the repository, or the .deb)", file=sys.stderr)
        return 2
    from libswarm.api.config import load_api_config
    from libswarm.errors import SwarmError

    try:
        config = load_api_config(a.config)
        app = create_app(config)
    except SwarmError as e:
        print(f"swarm-api: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the tokenizer or the keys file
        print(f"swarm-api: cannot read {e.filename or config.model}: {e.strerror or e}", file=sys.stderr)
        return 2
    host, port = config.api.listen
    logging.getLogger("swarm-api").info("serving %s on http://%s:%d (swarmd at %s)", config.model_name, host, port,
                                        config.socket)
    try:
        uvicorn.run(app, host=host, port=port, log_level=a.log_level, access_log=a.log_level == "debug",
                    timeout_graceful_shutdown=10)
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
