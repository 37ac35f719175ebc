"""The coordinator's Prometheus metrics, in a registry of its own (tests never fight a global one).

Names are namespaced `sparsecomm_coordinator_*` and in base units (bytes, seconds).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..protocol import REASONS, ROLES


@dataclass
class Metrics:
    registry: object = None
    rounds: object = None
    bytes_in: object = None
    bytes_out: object = None
    alive: object = None
    stragglers: object = None
    rejected: object = None
    latency: object = None
    late: object = None
    version: object = None
    journal: object = None
    server: object = None

    @classmethod
    def create(cls, port: int | None, addr: str) -> "Metrics":
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        r = CollectorRegistry()
        m = cls(registry=r,
                rounds=Counter("sparsecomm_coordinator_rounds", "Rounds aggregated", registry=r),
                bytes_in=Counter("sparsecomm_coordinator_received_bytes", "Bytes received (all frames)", registry=r),
                bytes_out=Counter("sparsecomm_coordinator_sent_bytes", "Bytes sent (all frames)", registry=r),
                alive=Gauge("sparsecomm_coordinator_workers_alive", "Joined workers seen within the heartbeat timeout",
                            ["role"], registry=r),
                stragglers=Counter("sparsecomm_coordinator_stragglers", "Trainers missing when a round closed", registry=r),
                rejected=Counter("sparsecomm_coordinator_rejected_messages",
                                 "Messages refused, by reason (rate_limited: dropped unread, no reply)", ["reason"],
                                 registry=r),
                latency=Histogram("sparsecomm_coordinator_round_seconds", "First push to aggregate sent", registry=r,
                                  buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)),
                late=Counter("sparsecomm_coordinator_late_deltas", "Deltas that missed their round", ["action"], registry=r),
                version=Gauge("sparsecomm_coordinator_weights_version", "Aggregates applied", registry=r),
                journal=Histogram("sparsecomm_coordinator_journal_seconds", "Appending (and fsyncing) one journal record",
                                  registry=r, buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1)))
        for reason in REASONS:
            m.rejected.labels(reason=reason)
        for role in ROLES:
            m.alive.labels(role=role)
        if port is not None:
            m.server, _ = start_http_server(port, addr=addr, registry=r)
        return m

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
