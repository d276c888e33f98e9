"""Prometheus metrics of the server: latency histograms, token counters, cache and queue gauges."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One registry per server, so several servers (or tests) never collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("lmforge_inter_token_latency_seconds", "Time between tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("lmforge_generated_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("lmforge_prompt_tokens", "Prompt tokens received", registry=r)
        self.requests = Counter("lmforge_requests", "Finished sequences by reason", ["finish_reason"], registry=r)
        self.running = Gauge("lmforge_running_sequences", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("lmforge_waiting_sequences", "Sequences waiting to be scheduled", registry=r)
        self.blocks_used = Gauge("lmforge_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.blocks_total = Gauge("lmforge_kv_blocks_total", "KV cache blocks in all", registry=r)
        self.prefix_hit_rate = Gauge("lmforge_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache",
                                     registry=r)
        self.semantic_hits = Counter("lmforge_semantic_cache_hits", "Semantic cache hits", registry=r)
        self.semantic_misses = Counter("lmforge_semantic_cache_misses", "Semantic cache misses", registry=r)
        self.semantic_hit_rate = Gauge("lmforge_semantic_cache_hit_rate", "Semantic cache hits / lookups",
                                       registry=r)
        self.spec_drafted = Gauge("lmforge_spec_draft_tokens", "Speculative draft tokens proposed", registry=r)
        self.spec_accepted = Gauge("lmforge_spec_accepted_tokens", "Speculative draft tokens accepted", registry=r)
        self.spec_acceptance = Gauge("lmforge_spec_acceptance_rate", "Accepted / proposed draft tokens", registry=r)
        self.guard_findings = Counter("lmforge_guard_findings", "Guard findings by stage (input, output) and kind",
                                      ["stage", "kind"], registry=r)
        self._token_times: dict[int, float] = {}

    def observe_step(self, engine, outputs) -> None:
        """Update everything one engine step changed (called under the engine lock)."""
        now = time.perf_counter()
        for out in outputs:
            seq = out.seq
            last = self._token_times.get(seq.seq_id)
            if last is None:
                self.ttft.observe(now - seq.arrival)
                self.prompt.inc(len(seq.prompt_ids))
            else:
                self.itl.observe(now - last)
            self._token_times[seq.seq_id] = now
            if out.token is not None:
                self.generated.inc()
            if out.finished:
                self.finished(seq, seq.finish_reason or "stop")
        self.refresh(engine)

    def refresh(self, engine) -> None:
        """Set the gauges from the engine's current state (also at every scrape)."""
        blocks = engine.blocks
        self.running.set(len(engine.scheduler.running))
        self.waiting.set(len(engine.scheduler.waiting))
        self.blocks_used.set(blocks.num_used)
        self.blocks_total.set(len(blocks.blocks))
        if blocks.prefix_queries:
            self.prefix_hit_rate.set(blocks.prefix_hits / blocks.prefix_queries)
        spec = getattr(engine, "speculation", None)
        if spec is not None and spec.stats.drafted:
            self.spec_drafted.set(spec.stats.drafted)
            self.spec_accepted.set(spec.stats.accepted)
            self.spec_acceptance.set(spec.stats.accepted / spec.stats.drafted)

    def finished(self, seq, reason: str) -> None:
        self._token_times.pop(seq.seq_id, None)
        self.requests.labels(finish_reason=reason).inc()

    def semantic_lookup(self, hit: bool) -> None:
        (self.semantic_hits if hit else self.semantic_misses).inc()
        hits, misses = self.semantic_hits._value.get(), self.semantic_misses._value.get()
        self.semantic_hit_rate.set(hits / (hits + misses))

    def render(self, engine=None) -> bytes:
        if engine is not None:
            self.refresh(engine)
        return generate_latest(self.registry)
