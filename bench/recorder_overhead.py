"""Recorder overhead: the same batches through the model with and without recording, side by side in one process.

Three ways, interleaved in every round (median over rounds):
- plain:      record.forward() on every batch (what the model costs anyway);
- esft:       the recorder (router hooks → Arrow → Parquet staging) plus the DuckDB ingest and aggregates at the end,
              into a fresh DB each round — the full cost of `esft record` minus tokenization;
- esft-style: the authors' way as the peer: a hook per router that writes each sample's ids and weights as TSV
              lines to expert_weights_<layer>.txt (like their patched modeling_deepseek.py).
Batches are 8 x 512 tokens: the demo task data (data/tasks/*/train.jsonl, authors' template) tokenized and packed into
512-token windows, or seeded random ids when that data is missing. Model: data/demo-moe when present, else a tiny
DeepSeek-V2-shaped random MoE (`--model tiny`) or any model path.
Prints a final JSON line: {"ratio": esft/plain, "esft_style_ratio": esft-style/plain, ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from esft_core.models.loading import DEMO_MODEL, load_model, moe_layout, tiny_moe, tiny_tokenizer  # noqa: E402
from esft_core.traces import record  # noqa: E402


def get_model(name: str):
    if name == "auto":
        name = "demo" if (DEMO_MODEL / "config.json").exists() else "tiny"
    if name == "tiny":
        # DeepSeek-V2 shape like the demo model: 1 dense + 4 MoE layers, 32 experts, top-4
        model = tiny_moe("deepseek_v2", seed=0, num_hidden_layers=5, hidden_size=128, intermediate_size=256,
                         n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=64,
                         max_position_embeddings=1024, vocab_size=2048)
        return model, tiny_tokenizer(), "tiny"
    model, tok = load_model(name)
    return model, tok, name


class TsvHook:
    """The authors' logging: per layer and sample, 'ids\\t...\\t\\tweights\\t...' appended to a text file."""

    def __init__(self, layout, out_dir: Path, lens: list[int]):
        self.files = {layer: open(out_dir / f"expert_weights_{layer}.txt", "a") for layer in layout.layers}
        self.handles = [layout.routers[layer].register_forward_hook(self.hook(layer)) for layer in layout.layers]
        self.lens = lens

    def hook(self, layer: int):
        def fn(module, inputs, output):
            w, idx = output[1], output[2]  # (B*S, K)
            start = 0
            for n in self.lens:  # one line per sample
                ids = idx[start: start + n].reshape(-1).tolist()
                ws = w[start: start + n].reshape(-1).tolist()
                self.files[layer].write("\t".join(str(i) for i in ids) + "\t\t"
                                        + "\t".join(str(round(x, 4)) for x in ws) + "\n")
                start += n

        return fn

    def close(self):
        for h in self.handles:
            h.remove()
        for f in self.files.values():
            f.close()


def windows(tok, n: int, seq_len: int, vocab: int) -> list[list[int]]:
    """n windows of seq_len tokens of the demo task data (all tasks, interleaved), else random ids."""
    from esft_core.data import encode_record, read_records

    files = sorted((REPO / "data" / "tasks").glob("*/train.jsonl"))
    stream: list[int] = []
    if files:
        per_task = [read_records(f, limit=400) for f in files]
        for i in range(400):
            for recs in per_task:
                if i < len(recs):
                    stream += encode_record(recs[i], tok)[0]
            if len(stream) >= n * seq_len:
                break
    if len(stream) < n * seq_len:
        g = torch.Generator().manual_seed(0)
        return torch.randint(3, vocab, (n, seq_len), generator=g).tolist()
    return [stream[i * seq_len: (i + 1) * seq_len] for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="auto", help="auto (demo if built, else tiny), tiny, demo, or a path")
    ap.add_argument("--batches", type=int, default=4, help="batches per round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, name = get_model(args.model)
    layout = moe_layout(model)
    seqs = windows(tok, args.batches * args.batch_size, args.seq_len, model.config.vocab_size)
    batches = [seqs[i: i + args.batch_size] for i in range(0, len(seqs), args.batch_size)]
    full = torch.ones(args.batch_size, args.seq_len, dtype=torch.long)

    def plain() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                record.forward(model, torch.tensor(b), full)
        return time.perf_counter() - t

    def esft(tmp: Path, i: int) -> float:
        t = time.perf_counter()
        record.record_sequences(model, tok, seqs, tmp / f"r{i}.duckdb", "bench", batch_size=args.batch_size)
        return time.perf_counter() - t

    def esft_style(tmp: Path, i: int) -> float:
        d = tmp / f"tsv{i}"
        d.mkdir()
        t = time.perf_counter()
        hook = TsvHook(layout, d, [args.seq_len] * args.batch_size)
        with torch.inference_mode():
            for b in batches:
                record.forward(model, torch.tensor(b), full)
        hook.close()
        return time.perf_counter() - t

    times = {"plain": [], "esft": [], "esft_style": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain()  # warm-up
        for i in range(args.rounds):
            runs = [("plain", plain), ("esft", lambda i=i: esft(tmp, i)),
                    ("esft_style", lambda i=i: esft_style(tmp, i))]
            for mode, fn in runs[i % 3:] + runs[: i % 3]:  # rotate the order: no mode always runs first
                times[mode].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = {k: statistics.median(a / b for a, b in zip(times[k], times["plain"], strict=True))
              for k in ("esft", "esft_style")}
    tokens = len(seqs) * args.seq_len
    result = {
        "ratio": round(med["esft"] / med["plain"], 3),
        "esft_style_ratio": round(med["esft_style"] / med["plain"], 3),
        "paired_ratio": round(paired["esft"], 3), "paired_esft_style_ratio": round(paired["esft_style"], 3),
        "model": name, "tokens_per_round": tokens, "moe_layers": len(layout.layers), "top_k": layout.top_k,
        "route_rows_per_round": tokens * len(layout.layers) * layout.top_k, "rounds": args.rounds,
        "median_s": {k: round(v, 3) for k, v in med.items()}, "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
