"""Load benchmark: N concurrent streaming clients against a running ``plexus serve`` (or any
OpenAI-compatible server), each with a prompt of its own, through the official ``openai`` client.

    python benchmarks/load.py --url http://127.0.0.1:8000/v1 --model NAME --clients 8 --max-tokens 64

Reports the aggregate generated tokens per second (all clients' tokens over the wall time from
the first request to the last answer), and the median and 90th percentile of the time to first
token (TTFT) and of the time per output token (TPOT: a client's time after its first token over
its further tokens). ``--json`` prints one object instead of the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

WORDS = ["Lily", "Tom", "a ball", "the sun", "a cat", "the park", "a red car", "a bird", "a cake", "a tree"]


def prompt(i: int) -> str:
    return f"{WORDS[i % len(WORDS)]} and {WORDS[(i // len(WORDS) + 3) % len(WORDS)]} went out, story {i}:"


def one_client(url: str, key: str, model: str, i: int, max_tokens: int, start: threading.Barrier) -> dict:
    import openai

    c = openai.OpenAI(base_url=url, api_key=key, max_retries=5)
    start.wait()
    t0 = time.perf_counter()
    times = []
    stream = c.completions.create(model=model, prompt=prompt(i), max_tokens=max_tokens, temperature=0, stream=True,
                                  stream_options={"include_usage": True})
    tokens = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    ttft = (times[0] if times else end) - t0
    tpot = (end - times[0]) / (tokens - 1) if times and tokens > 1 else None
    return {"tokens": tokens, "ttft_s": ttft, "tpot_s": tpot, "start": t0, "end": end}


def pct(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def run(url: str, key: str, model: str, clients: int, max_tokens: int) -> dict:
    start = threading.Barrier(clients)
    results: list[dict | None] = [None] * clients

    def work(i):
        results[i] = one_client(url, key, model, i, max_tokens, start)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [r for r in results if r is not None]
    wall = max(r["end"] for r in done) - min(r["start"] for r in done)
    ttft, tpot = [r["ttft_s"] for r in done], [r["tpot_s"] for r in done]
    return {"clients": clients, "answered": len(done), "tokens": sum(r["tokens"] for r in done), "wall_s": wall,
            "aggregate_tok_s": sum(r["tokens"] for r in done) / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p90_s": pct(ttft, 0.9),
            "tpot_p50_s": pct(tpot, 0.5), "tpot_p90_s": pct(tpot, 0.9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = run(a.url, a.api_key, a.model, a.clients, a.max_tokens)
    if a.json:
        print(json.dumps(r))
        return
    ms = lambda s: "-" if s is None else f"{s * 1e3:.1f} ms"  # noqa: E731
    print(f"{r['clients']} clients, {r['tokens']} tokens in {r['wall_s']:.2f} s: {r['aggregate_tok_s']:.1f} tok/s")
    print(f"TTFT p50 {ms(r['ttft_p50_s'])}, p90 {ms(r['ttft_p90_s'])}; "
          f"TPOT p50 {ms(r['tpot_p50_s'])}, p90 {ms(r['tpot_p90_s'])}")


if __name__ == "__main__":
    main()
