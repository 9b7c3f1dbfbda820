"""The bench's report as a table for people (--json prints the same as one object)."""

from __future__ import annotations

# ---- output -----------------------------------------------------------------------------------

def _gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def format_report(r: dict) -> str:
    ranks = range(r["world_size"])
    lines = [
        f"model            {r['model']}",
        f"world            {r['world_size']} rank(s), {r['dtype']}, threads {r['threads_per_rank']}, "
        f"devices {r['devices']}",
        f"tokens           {r['prompt_tokens']} prompt + {r['new_tokens']} new (EOS ignored)",
        f"load             {r['load_s']:.2f} s",
        f"time to first    {r['ttft_s'] * 1e3:.1f} ms  (prefill {r['prefill_tok_s']:.1f} tok/s)",
        f"decode           {r['decode_tok_s']:.2f} tok/s",
        *([f"batched          {r['batched_decode_tok_s']:.2f} tok/s with {r['concurrency']} streams at once "
           f"({r['batched_vs_one_stream']:.2f}x one stream)"] if r.get("concurrency") else []),
        f"bandwidth        {r['achieved_gbps']:.1f} GB/s of weights achieved / {r['bandwidth_limit_gbps']:.1f} "
        f"GB/s measured = {r['bandwidth_fraction']:.2f}",
    ]
    for i in ranks:
        dev = r["peak_device_bytes"][i]
        growth = r["rss_growth_bytes"][i]
        lines.append(f"  rank {i}         weights/step {_gib(r['weight_bytes_per_rank'][i])}, "
                     f"{r['achieved_gbps_per_rank'][i]:.1f} of {r['bandwidth_limit_gbps_per_rank'][i]:.1f} GB/s, "
                     f"peak RSS {_gib(r['peak_rss_bytes'][i])}"
                     + (f" (+{growth / 2**20:.1f} MiB during the timed run)" if growth is not None else "")
                     + (f", peak device {_gib(dev)}" if dev is not None else ""))
    for host, cores in r["other_load_cores"].items():
        lines.append(f"other load       {cores:.2f} cores busy with other programs on {host} during the timed run"
                     + ("  (figures disturbed)" if cores > 0.1 else ""))
    if "one_rank" in r:
        o, lo, hi = r["one_rank"], *r["decode_vs_one_rank_range"]
        lines.append(f"one rank         decode {o['decode_tok_s']:.2f} tok/s ({o['threads']} threads) vs pooled "
                     f"{r['paired_decode_tok_s']:.2f} tok/s, in {o['pairs']} alternating pairs of {o['block_tokens']}-token "
                     f"blocks")
        lines.append(f"pooled / one     decode {r['decode_vs_one_rank']:.3f}x (median of the pairs; {lo:.3f} to {hi:.3f})")
    if "baseline" in r:
        b = r["baseline"]
        lines.append(f"transformers     prefill {b['prefill_tok_s']:.1f} tok/s, decode {b['decode_tok_s']:.2f} tok/s "
                     f"({b['threads']} threads)")
        lines.append(f"plexus / base    decode {r['decode_vs_baseline']:.2f}x, prefill {r['prefill_vs_baseline']:.2f}x")
    return "\n".join(lines)
