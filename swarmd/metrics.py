"""Prometheus metrics over HTTP (`metrics.listen`, off by default): what the daemon serves,
how fast, its cache, its sessions, the peers it sees by state and the failovers it made."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PEER_STATES = ("online", "joining", "loading", "draining", "offline", "dead", "unreachable", "suspect", "mismatch",
               "contacting")


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = BUCKETS_S):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self.sum += seconds

    def lines(self, name: str) -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {total}", f"{name}_count {running}"]
        return out


def render(status: dict, step_seconds: Histogram | None) -> str:
    stats = status.get("stats") or {}
    lines = [
        "# HELP swarmd_steps_total Inference steps served.", "# TYPE swarmd_steps_total counter",
        f"swarmd_steps_total {stats.get('steps', 0)}",
        "# HELP swarmd_tokens_total Positions computed in inference steps.", "# TYPE swarmd_tokens_total counter",
        f"swarmd_tokens_total {stats.get('tokens', 0)}",
        "# HELP swarmd_forwards_total Cache-less forward passes served.", "# TYPE swarmd_forwards_total counter",
        f"swarmd_forwards_total {stats.get('forwards', 0)}",
        "# HELP swarmd_backwards_total Backward passes served.", "# TYPE swarmd_backwards_total counter",
        f"swarmd_backwards_total {stats.get('backwards', 0)}",
        "# HELP swarmd_errors_total Requests answered with an error.", "# TYPE swarmd_errors_total counter",
        f"swarmd_errors_total {stats.get('errors', 0)}",
        "# HELP swarmd_cache_bytes KV cache bytes by use.", "# TYPE swarmd_cache_bytes gauge",
        f'swarmd_cache_bytes{{kind="used"}} {status["cache"]["used_bytes"]}',
        f'swarmd_cache_bytes{{kind="free"}} {status["cache"]["free_bytes"]}',
        "# HELP swarmd_sessions Open sessions by role.", "# TYPE swarmd_sessions gauge",
        f'swarmd_sessions{{role="server"}} {status["sessions"]["server"]}',
        f'swarmd_sessions{{role="gateway"}} {status["sessions"]["gateway"]}',
        "# HELP swarmd_failovers_total Failed servers replaced in this gateway's sessions.",
        "# TYPE swarmd_failovers_total counter",
        f"swarmd_failovers_total {status['gateway']['failovers']}",
        "# HELP swarmd_peers Peers in the table by state.", "# TYPE swarmd_peers gauge",
    ]
    by_state = Counter(p["state"] for p in status.get("peers", []) if not p.get("is_self"))
    for state in PEER_STATES:
        lines.append(f'swarmd_peers{{state="{state}"}} {by_state.get(state, 0)}')
    if step_seconds is not None:
        lines += ["# HELP swarmd_step_seconds Time to compute one inference step of this span.",
                  "# TYPE swarmd_step_seconds histogram", *step_seconds.lines("swarmd_step_seconds")]
    return "\n".join(lines) + "\n"


class MetricsServer:
    def __init__(self, host: str, port: int, body: Callable[[], str]):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is here")
                    return
                data = body().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # scrapes are not worth a log line each
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True

    def serve(self, stop: threading.Event) -> None:
        self.httpd.timeout = 0.5
        while not stop.is_set():
            self.httpd.handle_request()
        self.httpd.server_close()
