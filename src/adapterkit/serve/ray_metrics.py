"""The whole deployment's ``/metrics`` and ``/health`` under ``serve --ray``.

Every replica pushes a report (its Prometheus exposition and its state) about once a second to
one named Ray actor per application, a ``MetricsBoard`` (``board_name``); the ingress reads the
board and answers ``GET /metrics`` (every live replica's samples with a ``replica`` label, plus
the ingress's own) and ``GET /health`` (live replicas and the adapters each holds). A replica
silent for more than ``STALE_SECONDS`` no longer counts. Nothing here imports Ray: the board is
a plain class that ``ray_deployment`` turns into an actor.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

PUSH_SECONDS = 1.0  # how often a replica reports
STALE_SECONDS = 10.0  # a replica silent for longer is left out

# the ingress counts these paths by name, any other as "other" (bounded label values)
_PATHS = ("/v1/classify", "/v1/generate", "/v1/adapters", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/health", "/metrics", "/openapi.json",
          "/docs")


def board_name(app_name: str) -> str:
    """The board's actor name for the Ray Serve application ``app_name``."""
    return f"adapterkit-metrics-{app_name}"


class MetricsBoard:
    """The latest report of every replica. A report carries the wall-clock time the replica made
    it, so a report that waited (for a board still starting, say) shows its true age; clocks of
    the nodes agree to well under ``STALE_SECONDS`` (NTP). ``ray_deployment`` runs it as a named
    actor."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, str, dict]] = {}

    def put(self, replica: str, made_at: float, exposition: str, state: dict) -> None:
        if made_at >= self.reports.get(replica, (0.0,))[0]:  # never an older report over a newer one
            self.reports[replica] = (made_at, exposition, state)

    def remove(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def read(self, max_age: float = STALE_SECONDS) -> dict[str, tuple[float, str, dict]]:
        """``{replica: (seconds since its report was made, exposition, state)}`` of the live
        replicas; the silent ones are forgotten."""
        now = time.time()
        for replica in [r for r, (at, _, _) in self.reports.items() if now - at > max_age]:
            del self.reports[replica]
        return {r: (max(now - at, 0.0), text, state) for r, (at, text, state) in sorted(self.reports.items())}


class _Merged:
    """A collector of the replicas' samples, each labelled with its ``replica``."""

    def __init__(self, reports: dict[str, tuple[float, str, dict]]):
        self.reports = reports

    def collect(self) -> list[Metric]:
        families: dict[str, Metric] = {}
        for replica, (_, text, _) in self.reports.items():
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value,
                                      sample.timestamp, sample.exemplar)
        return list(families.values())


class IngressMetrics:
    """The ingress's own metrics and the rendering of the deployment's."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("adapterkit_ingress_requests", "HTTP requests answered by the Ray ingress",
                                ["endpoint", "status"], registry=self.registry)
        self.replicas = Gauge("adapterkit_ray_replicas_live", "Replicas that reported in the last "
                              f"{STALE_SECONDS:g} seconds", registry=self.registry)
        self.ages = Gauge("adapterkit_ray_replica_report_age_seconds", "Seconds since the replica's last report",
                          ["replica"], registry=self.registry)

    def observe(self, path: str, status: int) -> None:
        self.requests.labels(path if path in _PATHS else "other", str(status)).inc()

    def render(self, reports: dict[str, tuple[float, str, dict]]) -> bytes:
        """Every live replica's exposition (``replica`` label) followed by the ingress's own."""
        self.replicas.set(len(reports))
        self.ages.clear()
        for replica, (age, _, _) in reports.items():
            self.ages.labels(replica).set(round(age, 3))
        return generate_latest(_Merged(reports)) + generate_latest(self.registry)


def deployment_health(reports: dict[str, tuple[float, str, dict]], model: str, adapters: int) -> tuple[int, dict]:
    """``/health`` of the deployment: (HTTP status, body). ``ok`` (200) while at least one
    replica is live, else ``unavailable`` (503)."""
    replicas = {r: {"resident": list(state.get("resident", [])), "queue": int(state.get("queue", 0)),
                    "seconds_since_report": round(age, 3)} for r, (age, _, state) in reports.items()}
    resident = sorted({name for r in replicas.values() for name in r["resident"]})
    body: dict[str, Any] = {"status": "ok" if replicas else "unavailable", "model": model, "adapters": adapters,
                            "queue": sum(r["queue"] for r in replicas.values()), "replicas": len(replicas),
                            "resident": resident, "replica": replicas}
    return (200 if replicas else 503), body
