"""The routing-trace recorder: forward hooks on the router of every MoE layer → Arrow batches → the trace store.

Every transformers-v5 MoE router returns `(router_logits (T, E), topk_weights (T, K), topk_indices (T, K))`, so one
forward hook per router sees everything (no patched modeling code). Some families return the top-K unsorted; we sort
each token's K pairs by weight, descending, so rank 0 is the strongest expert. Samples are taken in a seeded random
order (the authors shuffle, then stop after the sample that crosses the token budget), formatted with the authors'
template (data.encode_record), truncated to --seq-len, right-padded into batches; padding positions are dropped.

The run is staged as Parquet parts while the model runs and ingested in one transaction at the end (store.StagedRun),
so the DB file stays free for readers, and a killed recording leaves only a 'running' row that scores ignore.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from esft_core import store
from esft_core.data import IGNORE_INDEX, encode_record
from esft_core.errors import EsftError
from esft_core.models import MoeLayout, moe_layout

DEFAULT_MAX_TOKENS = 131072


@dataclass
class RouterTap:
    """Forward hooks that keep the last forward's top-K (weights, indices) of every MoE layer, on device."""

    layout: MoeLayout
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def __enter__(self) -> RouterTap:
        for layer in self.layout.layers:
            self.handles.append(self.layout.routers[layer].register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            # output = (router_logits (T, E), topk_weights (T, K), topk_indices (T, K)); T = batch * seq
            k = output[1].shape[-1]
            self.captured[layer] = (output[1].detach().reshape(-1, k), output[2].detach().reshape(-1, k))

        return hook

    def take(self, valid: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Rank-ordered (weights (L, T, K) float32, experts (L, T, K) int16) for the `valid` flat positions."""
        missing = [layer for layer in self.layout.layers if layer not in self.captured]
        if missing:
            raise EsftError(f"router of layer {missing[0]} did not run; is this a supported MoE family?")
        w = torch.stack([self.captured[layer][0] for layer in self.layout.layers])  # (L, B*S, K)
        e = torch.stack([self.captured[layer][1] for layer in self.layout.layers])  # (L, B*S, K)
        self.captured.clear()
        w, e = w[:, valid], e[:, valid]  # (L, T, K): drop padding
        w, order = torch.sort(w.float(), dim=-1, descending=True, stable=True)  # rank 0 = highest weight
        e = torch.gather(e, -1, order)
        return w.cpu().numpy(), e.to(torch.int16).cpu().numpy()


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The forward pass the recorder runs (and the benchmark's plain baseline): logits of the last position only."""
    return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)


def loss_flags(labels: Sequence[int]) -> list[bool]:
    """Per position: is its next-token prediction in the training loss (is the next label a real token)? (T,)"""
    return [lab != IGNORE_INDEX for lab in labels[1:]] + [False]


def choose_samples(records: Sequence[dict], tok, max_tokens: int, seq_len: int, seed: int, with_loss: bool = False):
    """Seeded order; encode until the budget is reached (the crossing sample is kept, as the authors do).
    Returns (seqs, total tokens), plus each sequence's loss_flags when `with_loss`."""
    if max_tokens < 1:
        raise EsftError(f"--max-tokens must be >= 1, got {max_tokens}")
    if seq_len < 2:
        raise EsftError(f"--seq-len must be >= 2, got {seq_len}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen, flags, total = [], [], 0
    for i in order:
        ids, labels = encode_record(records[i], tok)
        ids = ids[:seq_len]
        if not ids:
            continue
        chosen.append(ids)
        flags.append(loss_flags(labels[:seq_len]))
        total += len(ids)
        if total >= max_tokens:
            break
    if not chosen:
        raise EsftError("no tokens to record (every record encodes to nothing)")
    return (chosen, total, flags) if with_loss else (chosen, total)


class TokenTexts:
    """Cached token id → display text (decoding one id at a time, once per distinct id)."""

    def __init__(self, tok):
        self.tok = tok
        self.cache: dict[int, str] = {}

    def __call__(self, ids: np.ndarray) -> pa.Array:
        uniq, inv = np.unique(ids, return_inverse=True)
        for u in uniq.tolist():
            if u not in self.cache:
                self.cache[u] = self.tok.decode([u]) if self.tok is not None else str(u)
        return pa.array([self.cache[u] for u in uniq.tolist()], pa.string()).take(pa.array(inv.astype(np.int32)))


def batch_tables(sample_ids: np.ndarray, positions: np.ndarray, token_ids: np.ndarray, layers: list[int],
                 weights: np.ndarray, experts: np.ndarray, texts: pa.Array) -> dict[str, pa.Table]:
    """Arrow tables of one batch. Per-token arrays are (T,); weights/experts (L, T, K). Routes are layer-major."""
    n_l, n_t, k = weights.shape
    zeros = pa.repeat(pa.scalar(0, pa.int32()), n_t)
    tokens = pa.table({"run_id": zeros, "sample_id": sample_ids, "position": positions, "token_id": token_ids,
                       "token_text": texts})
    n = n_l * n_t * k
    routes = pa.table({
        "run_id": pa.repeat(pa.scalar(0, pa.int32()), n),
        "sample_id": np.tile(np.repeat(sample_ids, k), n_l),
        "position": np.tile(np.repeat(positions, k), n_l),
        "layer": np.repeat(np.asarray(layers, np.int16), n_t * k),
        "rank": np.tile(np.arange(k, dtype=np.int8), n_l * n_t),
        "expert": experts.reshape(-1),
        "weight": weights.reshape(-1),
        "token_id": np.tile(np.repeat(token_ids, k), n_l),  # staging only (store.StagedRun): for expert_tokens
    })
    return {"tokens": tokens, "routes": routes}


class Recorder:
    """Runs batches through the model with the router tap on and turns them into staged Arrow tables."""

    def __init__(self, model, tok, layout: MoeLayout | None = None):
        self.model = model
        self.layout = layout or moe_layout(model)
        self.texts = TokenTexts(tok)
        self.pad_id = getattr(tok, "pad_token_id", None) or 0
        self.device = next(model.parameters()).device

    def run_batch(self, seqs: list[list[int]], first_sample_id: int,
                  loss: list[list[bool]] | None = None) -> dict[str, pa.Table]:
        """Forward one batch of token-id lists; return its tokens/routes tables (run_id 0). `loss`: per-sequence
        loss_flags, stored as the tokens' `loss` column."""
        lens = [len(s) for s in seqs]
        width = max(lens)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)  # (B, S)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, S)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        valid = mask.reshape(-1).bool().to(self.device)  # (B*S,)
        with RouterTap(self.layout) as tap, torch.inference_mode():
            forward(self.model, ids.to(self.device), mask.to(self.device))
            weights, experts = tap.take(valid)  # (L, T, K)
        token_ids = ids.reshape(-1)[mask.reshape(-1).bool()].numpy().astype(np.int32)  # (T,)
        sample_ids = np.repeat(np.arange(first_sample_id, first_sample_id + len(seqs), dtype=np.int32), lens)
        positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
        tables = batch_tables(sample_ids, positions, token_ids, self.layout.layers, weights, experts,
                              self.texts(token_ids))
        if loss is not None:
            tables["tokens"] = tables["tokens"].append_column("loss", pa.array(np.concatenate(loss), pa.bool_()))
        return tables


def record(model, tok, records: Sequence[dict], db, task: str, *, max_tokens: int = DEFAULT_MAX_TOKENS,
           seq_len: int = 2048, batch_size: int = 8, seed: int = 0, model_name: str | None = None,
           params: dict | None = None, progress: Callable[[int, int], None] | None = None,
           flush_rows: int = 4_000_000) -> int:
    """Record the routing of `records` through `model` as a new complete run of `task` in `db`; return its run_id.

    progress(done_tokens, total_tokens) is called after every batch.
    """
    if not task:
        raise EsftError("--task must be a non-empty name")
    if batch_size < 1:
        raise EsftError(f"--batch-size must be >= 1, got {batch_size}")
    moe_layout(model)  # a model without MoE layers fails before anything is written
    seqs, _, flags = choose_samples(records, tok, max_tokens, seq_len, seed, with_loss=True)
    run_params = {"max_tokens": max_tokens, "seq_len": seq_len, "seed": seed, "n_records": len(records),
                  **(params or {})}
    return record_sequences(model, tok, seqs, db, task, batch_size=batch_size, model_name=model_name,
                            params=run_params, progress=progress, flush_rows=flush_rows, loss=flags)


def record_sequences(model, tok, seqs: list[list[int]], db, task: str, *, batch_size: int = 8,
                     model_name: str | None = None, params: dict | None = None,
                     progress: Callable[[int, int], None] | None = None, flush_rows: int = 4_000_000,
                     loss: list[list[bool]] | None = None) -> int:
    """Record already-tokenized samples (each a list of ids, one sample each); return the new run_id.
    `loss`: per-sample loss_flags (the tokens' `loss` column, for answer-token scores); None leaves it NULL."""
    rec = Recorder(model, tok)
    lay = rec.layout
    total = sum(len(s) for s in seqs)
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or lay.family
    staged = store.StagedRun(db, task, name, lay.num_experts, lay.top_k, lay.layers,
                             {"batch_size": batch_size, **(params or {})})
    try:
        pending: dict[str, list[pa.Table]] = {"samples": [], "tokens": [], "routes": []}
        n_pending, done = 0, 0
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start: start + batch_size]
            tables = rec.run_batch(chunk, start, None if loss is None else loss[start: start + batch_size])
            pending["tokens"].append(tables["tokens"])
            pending["routes"].append(tables["routes"])
            pending["samples"].append(pa.table({
                "run_id": pa.repeat(pa.scalar(0, pa.int32()), len(chunk)),
                "sample_id": np.arange(start, start + len(chunk), dtype=np.int32),
                "n_tokens": np.array([len(s) for s in chunk], np.int32),
                "text": [tok.decode(s) if tok is not None else None for s in chunk],
            }))
            n_pending += tables["routes"].num_rows
            done += sum(len(s) for s in chunk)
            if n_pending >= flush_rows:
                staged.stage({k: pa.concat_tables(v) for k, v in pending.items()})
                pending = {k: [] for k in pending}
                n_pending = 0
            if progress:
                progress(done, total)
        if pending["samples"]:
            staged.stage({k: pa.concat_tables(v) for k, v in pending.items()})
        staged.commit()
    except BaseException as e:
        staged.fail(f"{type(e).__name__}: {e}")
        raise
    return staged.run_id
