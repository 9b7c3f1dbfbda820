"""The server's Prometheus metrics, on a registry of their own (one per app, so tests can
create several apps in one process; ``prometheus_client``'s global registry would refuse)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: from a few milliseconds (tiny models) to minutes (a long prompt on CPUs)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ServerMetrics:
    def __init__(self, world_size: int, queue_depth: Callable[[], int], running: Callable[[], int],
                 registry: CollectorRegistry | None = None, kv: Callable[[], object] = lambda: None):
        """``kv``: the engine's BlockPool (engine/kv.py) once loaded, else None."""
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("plexus_requests", "HTTP requests answered, by route and status code.",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("plexus_prompt_tokens", "Prompt tokens of the requests run.", registry=r)
        self.generation_tokens = Counter("plexus_generation_tokens", "Tokens generated (including those of "
                                         "requests whose client went away).", registry=r)
        self.cancelled = Counter("plexus_requests_cancelled", "Generations stopped early because the client "
                                 "disconnected or the server shut down.", registry=r)
        self.ttft = Histogram("plexus_time_to_first_token_seconds", "From a request's arrival (queueing "
                              "included) to its first generated token.", buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("plexus_time_per_output_token_seconds", "Time between consecutive generated "
                              "tokens of one request.", buckets=_TPOT_BUCKETS, registry=r)
        g = Gauge("plexus_queue_depth", "Requests waiting for the engine (not counting the running one).",
                  registry=r)
        g.set_function(queue_depth)
        g = Gauge("plexus_requests_running", "Requests in the batch (prefilling or generating).", registry=r)
        g.set_function(running)
        self.prefix_hit_tokens = Counter("plexus_prefix_cache_hit_tokens", "Prompt tokens whose KV cache was "
                                         "found in the prefix cache (not computed again).", registry=r)
        for name, doc, fn in (
                ("plexus_kv_blocks_used", "KV-cache blocks that running sequences hold.", lambda p: p.used),
                ("plexus_kv_blocks_cached", "KV-cache blocks no sequence holds that keep a prompt prefix "
                 "(reusable; evicted least recently used first when the pool needs them).", lambda p: p.cached),
                ("plexus_kv_blocks_free", "KV-cache blocks holding nothing.", lambda p: p.blocks - p.used - p.cached),
                ("plexus_kv_blocks_total", "KV-cache blocks in the pool (16 tokens each).", lambda p: p.blocks)):
            g = Gauge(name, doc, registry=r)
            g.set_function(lambda fn=fn: fn(kv()) if kv() is not None else 0)
        Gauge("plexus_world_size", "Ranks (devices) the model is spread over.", registry=r).set(world_size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
