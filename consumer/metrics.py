"""Prometheus metrics of one node, in a registry of its own.

Owns the metric names and labels that dashboards rely on. Must never label by job id
(unbounded cardinality): outcomes, error codes and phases only.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_PHASE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 2400, 3600)


class Metrics:
    """The node's counters, gauges and histograms (exposed on /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "i2v_jobs_total",
            "Jobs that ended on this node, by outcome and error code.",
            ["outcome", "code"],
            registry=r,
        )
        self.in_flight = Gauge("i2v_jobs_in_flight", "Jobs running on this node now.", registry=r)
        self.phase_seconds = Histogram(
            "i2v_phase_seconds",
            "Seconds spent per phase of a job.",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "i2v_queue_wait_seconds",
            "Seconds from submission to claim.",
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        self.engine_restarts = Counter(
            "i2v_engine_restarts_total", "Times the engine process was restarted.", registry=r
        )
        self.uploaded_bytes = Counter(
            "i2v_uploaded_bytes_total", "Bytes of MP4 stored in the object store.", registry=r
        )
        self.dead_letters = Counter(
            "i2v_dead_letters_total", "Records sent to the dead-letter topic.", registry=r
        )

        self.reaped = Counter(
            "i2v_reaped_total",
            "Attempts this node's reaper found with an expired lease and handed back.",
            registry=r,
        )
        self.group_leaves = Counter(
            "i2v_group_leaves_total",
            "Times this node left i2v-workers while busy, so idle nodes take its partitions.",
            registry=r,
        )
        self.requeues = Counter(
            "i2v_requeues_total",
            "Attempts this node handed back itself, by reason.",
            ["reason"],
            registry=r,
        )

    def ended(self, outcome: str, code: str = "") -> None:
        self.jobs.labels(outcome=outcome, code=code).inc()
