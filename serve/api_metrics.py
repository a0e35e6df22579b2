"""Prometheus metrics of one API server (`GET /metrics`, text exposition format via `prometheus-client`).

Each server has its own registry (no process-global state, so two servers in one process, as in the tests, do not
share counts). Gauges are read from the generation worker when scraped; counters and the time-to-first-token
histogram are updated by the request handlers. Tokens per second is `rate(mmadapter_generated_tokens_total[1m])`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Time-to-first-token buckets (seconds): from a warm GPU's tens of milliseconds to a long queue on a CPU.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class APIMetrics:
    """The server's metrics; `waiting` and `running` are read at scrape time."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, waiting: Callable[[], float], running: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        Gauge(
            "mmadapter_queue_depth", "Requests accepted and waiting to generate", registry=self.registry
        ).set_function(waiting)
        Gauge(
            "mmadapter_running_requests", "Requests generating now (the running batch)", registry=self.registry
        ).set_function(running)
        self.requests = Counter(
            "mmadapter_requests",
            "Chat completion requests answered, by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "mmadapter_prompt_tokens", "Prompt tokens of accepted requests", registry=self.registry
        )
        self.generated_tokens = Counter("mmadapter_generated_tokens", "Tokens generated", registry=self.registry)
        self.time_to_first_token = Histogram(
            "mmadapter_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated text",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
