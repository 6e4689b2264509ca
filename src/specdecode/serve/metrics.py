"""The server's Prometheus metrics, named as vLLM names its own (with the `specdecode:` prefix in
place of `vllm:`), so that dashboards built for vLLM's speculative decoding read them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from specdecode.engine import GenerationStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """Counters, histograms and gauges of one server, in a registry of their own (two servers
    in one process, as in the tests, do not share counts)."""

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"labelnames": ["model_name"], "registry": self.registry}
        self.model = model

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"specdecode:{name}", doc, **labels)

        self.num_drafts = counter("spec_decode_num_drafts", "Target forwards that verified a draft")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Drafted tokens")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Accepted tokens")
        self.accepted_per_pos = Counter(
            "specdecode:spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens by their position in the draft",
            labelnames=["model_name", "position"],
            registry=self.registry,
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens")
        self.requests = Counter(
            "specdecode:request_success",
            "Finished requests, by why they finished",
            labelnames=["model_name", "finished_reason"],
            registry=self.registry,
        )

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"specdecode:{name}", doc, buckets=_LATENCY_BUCKETS, **labels)

        self.time_to_first_token = histogram("time_to_first_token_seconds", "Time to first token")
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between tokens (a step's time over its tokens)"
        )
        self.queue_time = histogram("request_queue_time_seconds", "Time waiting to be scheduled")
        self.batch_size = Histogram(
            "specdecode:batch_size",
            "Sequences verified by one target forward",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
            **labels,
        )
        self.forward_rows = Histogram(
            "specdecode:iteration_tokens_total",
            "Tokens (rows) in one target forward: every sequence's root and drafts",
            buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256),
            **labels,
        )
        self.running = Gauge("specdecode:num_requests_running", "Requests running", **labels)
        self.waiting = Gauge("specdecode:num_requests_waiting", "Requests waiting", **labels)

    def finished(self, stats: GenerationStats, reason: str) -> None:
        """Count a finished (or cancelled) request's work."""
        model = self.model
        drafts = stats.drafted_at_depth[0] if stats.drafted_at_depth else 0
        self.num_drafts.labels(model).inc(drafts)
        self.num_draft_tokens.labels(model).inc(stats.drafted_tokens)
        self.num_accepted_tokens.labels(model).inc(stats.accepted_tokens)
        for position, count in enumerate(stats.accepted_at_depth):
            self.accepted_per_pos.labels(model, str(position)).inc(count)
        self.prompt_tokens.labels(model).inc(stats.prompt_tokens)
        self.generation_tokens.labels(model).inc(stats.new_tokens)
        self.requests.labels(model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
