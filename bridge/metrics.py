"""Prometheus metrics of the bridge, served on METRICS_PORT when it is set.

Per-row metrics carry the row's `agent` label (`sum without (agent)` gives totals)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge.store import AgentSpend


class SpendCollector(Collector):
    """Tokens and cost by agent, as counters: the database keeps the totals (every
    worker's usage reports, agent_bridge.agent_usage); the bridge shows the last ones it
    read (each heartbeat)."""

    def __init__(self) -> None:
        self.totals: Sequence[AgentSpend] = ()

    def collect(self) -> Iterator[Metric]:
        tokens = CounterMetricFamily("agent_bridge_tokens", "Tokens the agent's tasks spent "
                                     "(kind: input, output, or unreported: reservations "
                                     "charged whole)", labels=["agent", "kind"])
        cost = CounterMetricFamily("agent_bridge_cost", "Cost the agent's tasks reported "
                                   "(in the handlers' unit), reservations charged whole "
                                   "included", labels=["agent"])
        for a in self.totals:
            tokens.add_metric([a.agent, "input"], a.input_tokens)
            tokens.add_metric([a.agent, "output"], a.output_tokens)
            tokens.add_metric([a.agent, "unreported"], a.unreported_tokens)
            cost.add_metric([a.agent], a.cost)
        yield tokens
        yield cost


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.claimed = Counter("agent_bridge_claimed", "Rows claimed", ["agent"], registry=r)
        self.enqueued = Counter("agent_bridge_enqueued", "Jobs published to the broker",
                                ["agent"], registry=r)
        self.released = Counter("agent_bridge_released", "Claims released after a failed publish",
                                ["agent"], registry=r)
        self.rescued = Counter("agent_bridge_rescued", "Expired leases taken back",
                               ["outcome"], registry=r)
        self.enqueue_failures = Counter("agent_bridge_enqueue_failures",
                                        "Publishes that failed", registry=r)
        self.backlog = Gauge("agent_bridge_backlog", "Due pending rows", ["agent"], registry=r)
        self.queue_depth = Gauge("agent_bridge_queue_depth",
                                 "Jobs waiting in the agent's broker queue", ["agent"],
                                 registry=r)
        self.oldest_pending = Gauge("agent_bridge_oldest_pending_seconds",
                                    "Age of the oldest due pending row", ["agent"], registry=r)
        self.processing = Gauge("agent_bridge_processing", "Rows being processed", ["agent"],
                                registry=r)
        self.failed = Gauge("agent_bridge_failed", "Rows that ended failed", ["agent"],
                            registry=r)
        self.spend = SpendCollector()
        r.register(self.spend)
        self.claim_seconds = Histogram(
            "agent_bridge_claim_duration_seconds", "Time of one claim round trip", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
