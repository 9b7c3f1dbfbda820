"""``GET /v1/pool`` (issue 20's JSON endpoint): the plan every rank agreed on and the live load,
from a real ``plexus serve`` under ``mpirun -n 2``; its shares equal ``plexus plan``'s."""

from __future__ import annotations

import json

import pytest

from tests.helpers import plexus_cmd, run
from tests.test_server_mpi import Serve, call, client, metric

KEY = "sk-pool"


@pytest.mark.timeout(300)
def test_pool_shows_each_rank_and_the_load(demo_tiny):
    s = Serve(demo_tiny, "--api-key", KEY).wait_ready()
    try:
        status, body = call(s.port, "GET", "/v1/pool")
        assert status == 401  # the key, as on the rest of /v1
        auth = {"Authorization": f"Bearer {KEY}"}
        client(s.port, KEY).completions.create(model="tiny", prompt="Once upon a time", max_tokens=24)
        status, pool = call(s.port, "GET", "/v1/pool", headers=auth)
        assert status == 200 and pool["model"] == "tiny" and pool["world_size"] == 2
        plan = json.loads(run(plexus_cmd("plan", "--model", demo_tiny, "--ranks", "2", "--json"), timeout=60).stdout)
        for got, want in zip(pool["ranks"], plan["ranks"], strict=True):
            for key in ("kv_heads", "q_heads", "mlp_columns", "vocab_rows", "weight_bytes"):
                assert got[key] == want[key], key
            assert got["host"] and got["device"] == "cpu" and got["kv_cache_bytes"] > 0
        kv = pool["kv_cache"]
        assert kv["blocks"] == metric(s.port, "plexus_kv_blocks_total") and kv["used"] == 0
        assert kv["cached"] + kv["free"] == kv["blocks"] and kv["block_tokens"] == 16
        assert pool["load"]["running"] == 0 and pool["load"]["waiting"] == 0
        assert pool["load"]["tokens_per_s"] > 0  # 24 tokens within the last 5 s
    finally:
        s.kill()
