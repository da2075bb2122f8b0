"""Prometheus metrics of the live service (the ONE place metric names are defined).

Names follow the Prometheus rules (base units, ``_total`` counters, ``_seconds``/``_bytes``/
``_meters`` suffixes). Scan ids are never labels (unbounded cardinality); per-scan figures go to
the publish socket and the control ``status`` reply instead. The names are a public interface:
Grafana dashboards in deploy/ query them, keep them stable (listed in daemon/SERVICE.md).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from .session import DROP_REASONS, OUTCOMES, STATES

PREFIX = "cryoptycho"
#: where the service catches an unexpected exception (label values of ``internal_errors``)
INTERNAL_ERROR_PLACES = ("ingest", "control", "publish", "housekeeping", "worker", "spool")

#: seconds; previews are due every 0.2 s at 5 Hz, so resolve well below and up to several seconds
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
UPDATE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServiceMetrics:
    """All metrics of one service instance, in its own registry (tests run several in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        p = PREFIX
        self.info = Info(f"{p}_build", "cryoptycho version and backend", registry=r)
        self.frames_received = Counter(
            f"{p}_frames_received", "Frames spooled to disk and accepted for reconstruction", registry=r
        )
        self.frames_dropped = Counter(
            f"{p}_frames_dropped", "Frames not used, by reason", ["reason"], registry=r
        )
        self.frames_used = Counter(
            f"{p}_frames_used", "Frames visited by at least one model update", registry=r
        )
        self.received_bytes = Counter(f"{p}_received_bytes", "Bytes of ingest messages", registry=r)
        self.spool_chunks = Counter(
            f"{p}_spool_chunks",
            "Whole spool chunks of frames written: as_received (the sender's bitshuffle-LZ4 bytes, not "
            "compressed again) or compressed by the spool, labelled with why",
            ["path"], registry=r,
        )
        self.messages_rejected = Counter(
            f"{p}_messages_rejected", "Ingest messages refused, by violated rule", ["rule"], registry=r
        )
        self.queue_depth = Gauge(f"{p}_queue_depth_frames", "Frames waiting for a worker", registry=r)
        self.queue_capacity = Gauge(
            f"{p}_queue_capacity_frames", "Frames the worker queues may hold per scan", registry=r
        )
        self.scans = Counter(f"{p}_scans", "Scans that reached a final state, by outcome", ["outcome"], registry=r)
        self.scans_in_state = Gauge(f"{p}_scans_in_state", "Scans currently in each state", ["state"], registry=r)
        self.iterations = Counter(f"{p}_iterations", "Mini-batch and full-batch updates", registry=r)
        self.loss = Gauge(f"{p}_loss", "Latest per-position loss of the most recently updated scan", registry=r)
        self.update_duration = Histogram(
            f"{p}_update_duration_seconds", "Duration of one engine update", buckets=UPDATE_BUCKETS, registry=r
        )
        self.preview_latency = Histogram(
            f"{p}_frame_to_preview_latency_seconds",
            "Time from a frame's arrival to the first preview that includes it",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.resolution = Gauge(
            f"{p}_resolution_meters", "Latest half-set FRC resolution estimate (any scan)", registry=r
        )
        self.last_frame = Gauge(
            f"{p}_last_frame_timestamp_seconds", "Unix time of the last frame received", registry=r
        )
        self.gpu_memory_used = Gauge(f"{p}_gpu_memory_used_bytes", "GPU memory in use on the device (all processes)", registry=r)
        self.gpu_memory_total = Gauge(f"{p}_gpu_memory_total_bytes", "GPU memory of the device", registry=r)
        self.memory_reserved = Gauge(
            f"{p}_memory_reserved_bytes", "Engine memory reserved by running scans", ["device"], registry=r
        )
        self.control_requests = Counter(
            f"{p}_control_requests", "Control requests, by method and success", ["method", "success"], registry=r
        )
        self.dectris_series = Counter(
            f"{p}_dectris_series", "DECTRIS series that did not become scans, by outcome (skipped: the "
            "header could not make a scan; rejected: our protocol refused it)", ["outcome", "field"], registry=r)
        self.dectris_header_warnings = Counter(
            f"{p}_dectris_header_warnings", "Implausible DECTRIS header values set aside, by header key",
            ["field"], registry=r)
        self.dectris_undecodable = Counter(
            f"{p}_dectris_messages_undecodable", "DECTRIS messages that could not be decoded at all "
            "(truncated, corrupt CBOR, broken multipart), by what was wrong", ["field"], registry=r)
        self.dectris_decoding_degraded = Counter(
            f"{p}_dectris_decoding_degraded", "Times the DECTRIS source's decoding worker processes could "
            "not be started (or restarted) and it fell back to decoding on threads", registry=r)
        self.dectris_decoding_fallback = Gauge(
            f"{p}_dectris_decoding_fallback", "1 while the DECTRIS source decodes on threads because its "
            "worker processes could not be started (tried again at series starts), else 0", registry=r)
        self.rollbacks = Counter(f"{p}_rollbacks", "Engine states rolled back after NaN or divergence", registry=r)
        self.up = Gauge(f"{p}_up", "1 while the service loop runs", registry=r)
        self.disk_free = Gauge(
            f"{p}_disk_free_bytes", "Free bytes of the file system of the spool and of the results directory "
            "(scans are refused below disk_reserve_bytes)", ["dir"], registry=r)
        self.internal_errors = Counter(
            f"{p}_internal_errors",
            "Unexpected exceptions the service caught and survived, by where they happened",
            ["where"], registry=r,
        )
        self.errors_suppressed = Counter(
            f"{p}_error_events_suppressed",
            "Error events folded into a 'suppressed' summary event by the publish rate limit", registry=r,
        )
        for reason in DROP_REASONS:
            self.frames_dropped.labels(reason=reason)
        for outcome in OUTCOMES:
            self.scans.labels(outcome=outcome)
        for state in STATES:
            self.scans_in_state.labels(state=state)
        for device in ("host", "device"):
            self.memory_reserved.labels(device=device)
        for where in INTERNAL_ERROR_PLACES:
            self.internal_errors.labels(where=where)
