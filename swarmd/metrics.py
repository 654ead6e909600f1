"""Prometheus metrics over HTTP (`metrics.listen`, off by default): what the daemon serves,
how fast, its cache, its sessions, the peers it sees by state and the failovers it made.

prometheus_client renders them: a collector reads the daemon's status at each scrape (the
counters live where the work is counted), and the step-time histogram is its own."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PEER_STATES = ("online", "joining", "loading", "draining", "offline", "dead", "unreachable", "suspect", "mismatch",
               "distrusted", "contacting")
COUNTERS = (("steps", "Inference steps served."), ("tokens", "Positions computed in inference steps."),
            ("forwards", "Cache-less forward passes served."), ("backwards", "Backward passes served."),
            ("errors", "Requests answered with an error."),
            ("shed", "Requests dropped unrun: their deadline passed while they waited for compute."),
            ("limited", "Requests refused by a per-key limit: its request rate, or its work waiting for compute."),
            ("runs", "Times the blocks ran for steps (a batch of several sessions' steps is one)."),
            ("batched_steps", "Steps that ran in a batch with other sessions' steps."))


def step_histogram() -> Histogram:
    """Time to compute one inference step of this span, or one batch of several sessions' steps
    (registered by the daemon's registry)."""
    return Histogram("swarmd_step_seconds", "Time to compute one inference step (or batch of steps) of this span.",
                     buckets=BUCKETS_S,
                     registry=None)


class StatusCollector:
    """The daemon's status document as metric families, read at each scrape."""

    def __init__(self, status: Callable[[], dict], step_seconds: Callable[[], Histogram | None]):
        self.status, self.step_seconds = status, step_seconds

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        stats = status.get("stats") or {}
        for name, text in COUNTERS:
            yield CounterMetricFamily(f"swarmd_{name}", text, value=stats.get(name, 0))
        cache = GaugeMetricFamily("swarmd_cache_bytes", "KV cache bytes by use.", labels=["kind"])
        cache.add_metric(["used"], status["cache"]["used_bytes"])
        cache.add_metric(["free"], status["cache"]["free_bytes"])
        yield cache
        sessions = GaugeMetricFamily("swarmd_sessions", "Open sessions by role.", labels=["role"])
        for role in ("server", "gateway"):
            sessions.add_metric([role], status["sessions"][role])
        yield sessions
        yield GaugeMetricFamily("swarmd_queued", "Requests waiting for the compute thread.",
                                value=stats.get("queued", 0))
        yield CounterMetricFamily("swarmd_failovers", "Failed servers replaced in this gateway's sessions.",
                                  value=status["gateway"]["failovers"])
        yield CounterMetricFamily("swarmd_step_resends", "Steps sent again to the same server after no answer in "
                                  "time (a lost message).", value=status["gateway"].get("resends", 0))
        peers = GaugeMetricFamily("swarmd_peers", "Peers in the table by state.", labels=["state"])
        by_state = Counter(p["state"] for p in status.get("peers", []) if not p.get("is_self"))
        for state in PEER_STATES:
            peers.add_metric([state], by_state.get(state, 0))
        yield peers
        histogram = self.step_seconds()
        if histogram is not None:
            yield from histogram.collect()


def registry(status: Callable[[], dict], step_seconds: Callable[[], Histogram | None]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatusCollector(status, step_seconds))
    return reg


class MetricsServer:
    """Serves /metrics (only) from `reg`; its own thread, stopped with the daemon."""

    def __init__(self, host: str, port: int, reg: CollectorRegistry):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is here")
                    return
                data = generate_latest(reg)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
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
