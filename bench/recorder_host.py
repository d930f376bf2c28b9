"""Recorder host work at DeepSeek-V2-Lite shape, without a model: synthetic router outputs, the real recorder code.

Shape: 26 MoE layers x top-6 of 64 experts (156 route rows per token), batches of 8 x 256..512 tokens, token ids
log-uniform over a 32k vocabulary (Zipf-like, as in text). Each batch's
routing is written into the tap exactly as the experts' pre-hooks would (record.RouterTap.captured), then the
recorder's own code runs: RouterTap.take (drop padding, sort by weight), record.device_sums and LayerScale (the
per-(sample, layer, expert) sums, on the model's device: the CPU here), the copy to host, and the writer's host work
(record.Writer running record._builder: Arrow tables, per-(layer, expert, token) sums), then StagedRun.commit (the
one DuckDB ingest + aggregates). Measured side by side in one run (after an untimed warm-up):

- serial:  every step in the main thread (Writer(threaded=False)), timed per stage → `host_us_per_token` =
           (copy to host + writer + ingest) / tokens for the default (tables held in memory until the ingest), and
           `host_us_per_token_parquet_parts` when the writer spills Parquet parts every --spill-rows rows (what a
           recording longer than record.FLUSH_ROWS rows does); `device_us_per_token` = take + device sums (GPU work
           when the model runs on a GPU; on this CPU they run on the host and are reported separately, not hidden);
- overlap: the forward is simulated by sleeping (a GPU forward leaves the CPU free) for as long as the serial host
           work of a batch took (so the forward is at least as long as the host work); `plain` sleeps only, `recorder`
           sleeps and runs the recorder with its background writer thread, then commits. The device part is done
           before the clock starts (on a GPU it is a few kernels inside the forward; its CPU time here is
           device_us_per_token). overlapped_ratio = recorder wall time / plain wall time with progressive ingest
           (`--progressive-ingest`: the writer thread inserts every --flush-rows rows into DuckDB as it goes);
           overlapped_ratio_end_ingest: the default (one ingest at the end, not overlapped).
`--routes none` (aggregate-only) is measured too (`host_us_per_token_routes_none`).
Prints stage timings, the machine's load, and a final JSON line with keys host_us_per_token and overlapped_ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from esft_core.models.loading import MoeLayout  # noqa: E402
from esft_core.traces import record, staging  # noqa: E402

N_LAYERS, TOP_K, N_EXPERTS, BATCH, SEQ = 26, 6, 64, 8, 512


def layout() -> MoeLayout:
    layers = list(range(1, N_LAYERS + 1))
    return MoeLayout("deepseek_v2", layers, N_EXPERTS, TOP_K, 2048, {}, {}, {},
                     layer_experts=dict.fromkeys(layers, N_EXPERTS), layer_top_k=dict.fromkeys(layers, TOP_K),
                     routing=dict.fromkeys(layers, "experts_input"))


def synthetic_batches(n: int, seed: int = 0):
    """n distinct batches: (lens, token_ids (B, S), {layer: (weights (B*S, K), ids (B*S, K))}), unsorted top-K."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lens = [int(x) for x in torch.randint(SEQ // 2, SEQ + 1, (BATCH,), generator=g)]
        # token ids Zipf-distributed like text (s = 1.1 over a 32k vocabulary), not uniform: expert_tokens has one
        # row per (layer, expert, distinct token), so uniform ids would make it as large as the routes
        u = torch.rand(BATCH, SEQ, generator=g, dtype=torch.float64)
        ids = (4 + torch.floor(torch.exp(u * np.log(32000.0)))).long().clamp_max(31999)  # log-uniform ≈ Zipf(1)
        captured = {}
        for layer in range(1, N_LAYERS + 1):
            logits = torch.randn(BATCH * SEQ, N_EXPERTS, generator=g)
            w, e = torch.softmax(logits, -1).topk(TOP_K, -1, sorted=False)
            captured[layer] = (w, e)
        out.append((lens, ids, captured))
    return out


class Texts:
    """Token texts without a tokenizer (record.TokenTexts with ids as strings)."""

    def __init__(self):
        self.t = record.TokenTexts(None)


def device_part(lay, lens, ids, captured, scale):
    """What runs on the model's device per batch: take + sums; returns host copies (the D2H copy is host work)."""
    tap = record.RouterTap(lay)
    tap.captured = dict(captured)
    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    for i, n in enumerate(lens):
        mask[i, :n] = True
    valid = mask.reshape(-1)
    sample_of = torch.arange(BATCH).repeat_interleave(torch.tensor(lens))
    w, e = tap.take(valid)
    cnt, gate, ngate, wsum = record.device_sums(w, e, sample_of, BATCH, N_EXPERTS)
    scale.update(wsum, e)
    return valid, (w, e, cnt, gate, ngate)


def to_host(lens, ids, valid, dev, routes: bool):
    w, e, cnt, gate, ngate = dev
    b = {"lens": lens, "token_ids": ids.reshape(-1)[valid].numpy().astype(np.int32), "cnt": cnt.numpy(),
         "gate": gate.numpy(), "ngate": ngate.numpy()}
    if routes:
        b["weights"], b["experts"] = w.numpy(), e.to(torch.int16).numpy()
    return b


def prepared(lay, batches, routes: bool = True) -> tuple[list, record.LayerScale, float]:
    """The device part of every batch, done up front: (host arrays per batch, layer scale, seconds it took)."""
    scale = record.LayerScale(N_LAYERS, "cpu")
    out, t = [], 0.0
    for lens, ids, captured in batches:
        t0 = time.perf_counter()
        valid, dev = device_part(lay, lens, ids, captured, scale)
        t += time.perf_counter() - t0
        out.append((lens, ids, valid, dev))
    return out, scale, t


def serial(lay, batches, db, routes: bool, texts, flush_rows: int = record.FLUSH_ROWS) -> dict:
    """Every step in the main thread (the writer runs inline), timed per stage. flush_rows below the run's route
    rows: the writer spills Parquet parts (what a recording longer than FLUSH_ROWS rows does)."""
    t = dict.fromkeys(("device", "copy", "writer", "ingest"), 0.0)
    staged = staging.StagedRun(db, "bench", "synthetic", N_EXPERTS, TOP_K, lay.layers, {"routes": "all"})
    scale = record.LayerScale(N_LAYERS, "cpu")
    writer = record.Writer(staged, flush_rows, texts.t, threaded=False)
    for bi, (lens, ids, captured) in enumerate(batches):
        t0 = time.perf_counter()
        valid, dev = device_part(lay, lens, ids, captured, scale)
        t1 = time.perf_counter()
        b = to_host(lens, ids, valid, dev, routes)
        t2 = time.perf_counter()
        sids = list(range(bi * BATCH, (bi + 1) * BATCH))
        writer.put(record._builder(b, sids, [[0] * n for n in lens], np.ones(BATCH, bool), lay.layers, texts.t, None))
        t3 = time.perf_counter()
        t["device"] += t1 - t0
        t["copy"] += t2 - t1
        t["writer"] += t3 - t2
    t3 = time.perf_counter()
    writer.close()
    staged.hold({"layer_stats": scale.table(lay.layers)})
    t["writer"] += time.perf_counter() - t3
    t5 = time.perf_counter()
    staged.commit()
    t["ingest"] = time.perf_counter() - t5
    return t


def overlapped(lay, batches, db, fwd_s: float, texts, progressive: bool = False,
               flush_rows: int = record.FLUSH_ROWS) -> tuple[float, float]:
    """(plain, recorder) wall times. The device part (take + sums: GPU kernels inside the forward on a GPU, timed
    separately as device_us_per_token) is done before the clock starts; the recorder's loop does what the host does
    per batch: the D2H copy, handing the batch to the writer thread, and the writer's work and ingest."""
    dev, scale, _ = prepared(lay, batches)
    t0 = time.perf_counter()
    for _ in batches:
        time.sleep(fwd_s)  # the plain forward
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    staged = staging.StagedRun(db, "bench", "synthetic", N_EXPERTS, TOP_K, lay.layers, {"routes": "all"})
    writer = record.Writer(staged, flush_rows, texts.t, progressive=progressive)
    for bi, (lens, ids, valid, d) in enumerate(dev):
        time.sleep(fwd_s)  # the forward (GPU); the hooks' captures and device sums are ready after it
        b = to_host(lens, ids, valid, d, True)
        sids = list(range(bi * BATCH, (bi + 1) * BATCH))
        writer.put(record._builder(b, sids, [[0] * n for n in lens], np.ones(BATCH, bool), lay.layers, texts.t, None))
    writer.close()
    staged.hold({"layer_stats": scale.table(lay.layers)})
    staged.commit()
    return plain, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=192, help="batches of 8 x <=512 tokens (default 192: ~570k tokens; "
                    "the overlap has a fixed ~0.75 s tail, so short runs overstate it)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--flush-rows", type=int, default=1_000_000,
                    help="route rows per progressive insert in the progressive-ingest run (default 1M: ~2 batches)")
    ap.add_argument("--spill-rows", type=int, default=4_000_000,
                    help="route rows per Parquet part in the spilling variant (default 4M: the run spills once)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lay = layout()
    distinct = synthetic_batches(4)
    batches = [distinct[i % len(distinct)] for i in range(args.batches)]
    n_tok = sum(sum(b[0]) for b in batches)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        serial(lay, batches[:2], tmp / "warm.duckdb", True, Texts())  # imports and first-use costs, not timed
        variants = {"routes all, in memory (default)": serial(lay, batches, tmp / "a.duckdb", True, Texts()),
                    "routes all, Parquet parts": serial(lay, batches, tmp / "p.duckdb", True, Texts(),
                                                        flush_rows=args.spill_rows),
                    "routes none": serial(lay, batches, tmp / "n.duckdb", False, Texts())}
        host = {k: sum(s[x] for x in ("copy", "writer", "ingest")) for k, s in variants.items()}
        s_all = variants["routes all, in memory (default)"]
        h_all, h_spill, h_none = host.values()
        # the forward: at least as long as the host work of a batch, staging and its share of the ingest included
        fwd_s = h_all / len(batches)
        plain, rec = overlapped(lay, batches, tmp / "o.duckdb", fwd_s, Texts(), progressive=True,
                                flush_rows=args.flush_rows)
        plain_end, rec_end = overlapped(lay, batches, tmp / "e.duckdb", fwd_s, Texts())
    us = 1e6 / n_tok
    print(f"{n_tok} tokens ({len(batches)} batches of {BATCH} x <= {SEQ}), {N_LAYERS} layers x top-{TOP_K} of "
          f"{N_EXPERTS} ({n_tok * N_LAYERS * TOP_K} route rows); load {Path('/proc/loadavg').read_text().split()[0]}")
    for name, s in variants.items():
        print(f"  {name}: device-side (take + sums, on CPU here) {s['device'] * us:.1f} us/tok | host "
              f"{host[name] * us:.1f} us/tok: copy {s['copy'] * us:.1f}, writer (Arrow, token sums, spills) "
              f"{s['writer'] * us:.1f}, ingest + aggregates {s['ingest'] * us:.1f}")
    print(f"  host work, Parquet parts / in memory: {h_spill / h_all:.2f}x")
    print(f"  overlap: simulated forward {fwd_s * 1e3:.0f} ms/batch; plain {plain:.2f} s, recorder with progressive "
          f"ingest {rec:.2f} s ({rec / plain:.3f}); plain {plain_end:.2f} s, recorder ingesting at the end (default) "
          f"{rec_end:.2f} s ({rec_end / plain_end:.3f})")
    print(json.dumps({"host_us_per_token": round(h_all * us, 1), "overlapped_ratio": round(rec / plain, 3),
                      "overlapped_ratio_end_ingest": round(rec_end / plain_end, 3),
                      "host_us_per_token_parquet_parts": round(h_spill * us, 1),
                      "device_us_per_token": round(s_all["device"] * us, 1),
                      "host_us_per_token_routes_none": round(h_none * us, 1), "tokens": n_tok}))


if __name__ == "__main__":
    main()
