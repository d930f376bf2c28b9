"""The routing-trace recorder: hooks where the experts of every MoE layer receive their routing → Arrow → the store.

What is recorded is the routing the experts module actually receives: a forward pre-hook reads the
`(hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K))` arguments of its forward, so every router variant
(softmax, sigmoid + bias, group-limited, hash, ...) is covered without knowing it. For experts run densely on
router-scaled inputs (Llama4: `layout.routing[layer] == 'router_dense'`) a forward hook on the router takes the top-K
of its (T, E) scores instead. Slots that are not routes to an expert are dropped and counted in the run's params
(`dropped_slots`): ids >= E (Longcat's zero-computation experts, transformers < 5.25) and, for families whose
MoE block masks its 'skip' / identity experts as (an id, weight 0) before the experts see them (Zaya; Longcat from
transformers 5.25 on), weight-0 slots. Each token's K pairs are sorted by weight, descending (rank 0 =
strongest). Per token and layer the sum of its top-K weights (the gate scale: 1.0 for normalised softmax, 2.5 for
DeepSeek-V3's scaling, ...) is reduced on the device into `layer_stats`, and each weight divided by it gives the
scale-free per-(layer, expert) sums of `expert_norm_stats` (score `gate_norm`).

Per-(sample, layer, expert) counts and gate sums are computed on the device, so `--routes none` (aggregate-only) and
`--routes sample:N` (routes of the first N samples of the seeded order only) keep scores, selection and the explorer's
expert views working. Host work (Arrow tables, Parquet staging) runs on a background writer thread while the model
computes the next batch. Samples are taken in a seeded random order (the authors shuffle, then stop after the sample
that crosses the token budget), formatted with the authors' template (data.encode_record), truncated to --seq-len,
sorted by length within windows of batches (length bucketing: less padding), right-padded; padding is dropped.

Under `torchrun` (WORLD_SIZE > 1) rank r records samples r, r+W, ... of the same seeded list under their global
sample ids into its own staged parts of one run; rank 0 ingests all parts once every rank is done, so the result
equals a single-process recording row for row.

The run is staged as Parquet parts while the model runs and ingested in one transaction at the end (staging.StagedRun),
so the DB file stays free for readers, and a killed recording leaves only a 'running' row that scores ignore.
"""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from esft_core.data import IGNORE_INDEX, encode_record
from esft_core.errors import EsftError
from esft_core.models.loading import MoeLayout, moe_layout
from esft_core.traces import staging
from esft_core.traces.writer import (  # noqa: F401  (re-exported: the recorder's host side lived here)
    TokenTexts,
    Writer,
    _builder,
    _token_key,
    batch_tables,
    expert_tokens_table,
    stats_table,
    with_loss_column,
)

DEFAULT_MAX_TOKENS = 131072
# route rows kept in memory before the writer spills them to Parquet (or, progressive, inserts them): ~21 bytes a row
# in Arrow, so ~340 MB; a recording of the default budget at V2-Lite shape (20 M rows) spills once
FLUSH_ROWS = 16_000_000
PROGRESSIVE_ROWS = 4_000_000  # route rows per insert with --progressive-ingest


def parse_routes(spec: str | None) -> int | None:
    """'all' → None (every sample's routes), 'none' → 0, 'sample:N' → N (routes of the first N samples)."""
    if spec in (None, "all"):
        return None
    if spec == "none":
        return 0
    if isinstance(spec, str) and spec.startswith("sample:") and spec[7:].isdigit() and int(spec[7:]) > 0:
        return int(spec[7:])
    raise EsftError(f"--routes: expected all, none or sample:N (N >= 1), got {spec!r}")


def _routing_args(experts: torch.nn.Module):
    """A function (args, kwargs) → (top_k_index, top_k_weights) for the forward of `experts`."""
    fwd = getattr(type(experts).forward, "__wrapped__", type(experts).forward)
    sig = inspect.signature(fwd)

    def get(args, kwargs):
        bound = sig.bind_partial(experts, *args, **kwargs).arguments
        names = [n for n in sig.parameters if n != "self"]
        return bound[names[1]], bound[names[2]]  # (hidden_states, top_k_index, top_k_weights, ...) by position

    return get


@dataclass
class RouterTap:
    """Hooks that keep the last forward's top-K (weights, indices) of every MoE layer as the experts receive them."""

    layout: MoeLayout
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def __enter__(self) -> RouterTap:
        for layer in self.layout.layers:
            if self.layout.routing.get(layer, "experts_input") == "router_dense":
                self.handles.append(self.layout.routers[layer].register_forward_hook(self._dense_hook(layer)))
            else:
                self.handles.append(self.layout.experts[layer].register_forward_pre_hook(
                    self._experts_hook(layer, _routing_args(self.layout.experts[layer])), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _experts_hook(self, layer: int, get):
        def hook(module, args, kwargs):
            idx, w = get(args, kwargs)  # (T, K) each; T = batch * seq
            k = idx.shape[-1]
            self.captured[layer] = (w.detach().reshape(-1, k), idx.detach().reshape(-1, k))

        return hook

    def _dense_hook(self, layer: int):
        k = self.layout.layer_top_k[layer]

        def hook(module, inputs, output):
            scores = output[0] if isinstance(output, tuple) else output  # (T, E), 0 outside the top-K
            w, idx = torch.topk(scores.detach().float(), k, dim=-1)
            self.captured[layer] = (w, idx)

        return hook

    def take(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-ordered (weights (L, T, K) float32, experts (L, T, K) int64) of the `valid` flat positions, on device;
        dropped (non-expert) slots come last with expert -1 and weight 0."""
        missing = [layer for layer in self.layout.layers if layer not in self.captured]
        if missing:
            raise EsftError(f"the experts of layer {missing[0]} did not run; is this a supported MoE family?")
        k = max(self.captured[layer][0].shape[-1] for layer in self.layout.layers)
        ws, es = [], []
        for layer in self.layout.layers:
            # device_map="auto": each layer's (T, K) routing comes to the device of `valid` (the input embeddings');
            # a copy 1/H the size of the hidden states the pipeline moves between its devices anyway
            w, e = (x.to(valid.device, non_blocking=True) for x in self.captured[layer])
            if w.shape[0] != valid.shape[0]:
                raise EsftError(f"layer {layer}: the experts received {w.shape[0]} tokens, the batch has "
                                f"{valid.shape[0]} positions; this routing layout is not supported")
            if w.shape[-1] < k:  # per-layer K: pad with empty slots (dropped below)
                w = torch.cat([w, w.new_zeros(w.shape[0], k - w.shape[-1])], -1)
                e = torch.cat([e, e.new_full((e.shape[0], k - e.shape[-1]), -1)], -1)
            ws.append(w)
            es.append(e)
        self.captured.clear()
        w, e = torch.stack(ws)[:, valid].float(), torch.stack(es)[:, valid].long()  # (L, T, K): padding dropped
        n_exp = torch.tensor([self.layout.layer_experts[layer] for layer in self.layout.layers], device=e.device)
        keep = (e >= 0) & (e < n_exp[:, None, None])  # ids >= E: zero-computation / identity experts
        if self.layout.masked_zero_slots:
            keep &= w != 0  # a masked 'skip' slot arrives as (id 0, weight 0)
        key = torch.where(keep, w, torch.full_like(w, -torch.inf))  # dropped slots sort last
        _, order = torch.sort(key, dim=-1, descending=True, stable=True)  # rank 0 = highest weight
        w, e, keep = (torch.gather(x, -1, order) for x in (w, e, keep))
        return torch.where(keep, w, 0.0), torch.where(keep, e, -1)


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


def device_sums(w: torch.Tensor, e: torch.Tensor, sample_of: torch.Tensor, n_samples: int, num_experts: int):
    """Per-(sample, layer, expert) sums of one batch, on the device.

    w, e: (L, T, K) from RouterTap.take (e = -1 on dropped slots); sample_of: (T,) batch-local sample index.
    Returns n_selected, gate_sum, norm_gate_sum (each (B, L, E)) and per-token top-K sums wsum (L, T).
    """
    n_l, n_t, k = w.shape
    keep = e >= 0
    wsum = w.sum(-1)  # (L, T): the gate scale of each token
    norm = w / wsum.clamp_min(torch.finfo(w.dtype).tiny)[..., None]  # (L, T, K): sums to 1 per token
    flat = ((sample_of[None, :, None] * n_l + torch.arange(n_l, device=w.device)[:, None, None]) * num_experts
            + e.clamp_min(0))  # (L, T, K) index into (B, L, E)
    flat, keepf = flat[keep], keep.float()
    size = n_samples * n_l * num_experts
    cnt = torch.zeros(size, device=w.device).index_add_(0, flat, keepf[keep])
    gate = torch.zeros(size, device=w.device, dtype=torch.float64).index_add_(0, flat, w[keep].double())
    ngate = torch.zeros(size, device=w.device, dtype=torch.float64).index_add_(0, flat, norm[keep].double())
    shape = (n_samples, n_l, num_experts)
    return cnt.view(shape), gate.view(shape), ngate.view(shape), wsum


class LayerScale:
    """Running per-layer statistics of the per-token top-K weight sum (the gate scale), on the device."""

    def __init__(self, n_layers: int, device):
        self.n = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self.sum = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self.min = torch.full((n_layers,), torch.inf, dtype=torch.float64, device=device)
        self.max = torch.full((n_layers,), -torch.inf, dtype=torch.float64, device=device)
        self.dropped = torch.zeros(n_layers, dtype=torch.float64, device=device)

    def update(self, wsum: torch.Tensor, experts: torch.Tensor) -> None:  # wsum (L, T), experts (L, T, K)
        if wsum.shape[1] == 0:
            return
        ws = wsum.double()
        self.n += ws.shape[1]
        self.sum += ws.sum(1)
        self.min = torch.minimum(self.min, ws.min(1).values)
        self.max = torch.maximum(self.max, ws.max(1).values)
        self.dropped += (experts < 0).sum((1, 2)).double()

    def table(self, layers: list[int]) -> pa.Table:
        return pa.table({"run_id": pa.repeat(pa.scalar(0, pa.int32()), len(layers)),
                         "layer": np.asarray(layers, np.int16), "n_tokens": self.n.cpu().numpy().astype(np.int64),
                         "weight_sum": self.sum.cpu().numpy(), "weight_sum_min": self.min.cpu().numpy(),
                         "weight_sum_max": self.max.cpu().numpy(),
                         "n_dropped": self.dropped.cpu().numpy().astype(np.int64)})


class Recorder:
    """Runs batches through the model with the tap on; returns host arrays of the batch (tables built elsewhere)."""

    def __init__(self, model, tok, layout: MoeLayout | None = None):
        self.model = model
        self.layout = layout or moe_layout(model)
        self.texts = TokenTexts(tok)
        self.pad_id = getattr(tok, "pad_token_id", None) or 0
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.device = emb.weight.device if emb is not None else next(model.parameters()).device  # device_map="auto"
        self.scale = LayerScale(len(self.layout.layers), self.device)

    def forward_batch(self, seqs: list[list[int]], want_routes: bool = True) -> dict:
        """Forward one batch; device-side sums; host copies of what the writer needs."""
        lens = [len(s) for s in seqs]
        width = max(lens)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)  # (B, S)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, S)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        valid = mask.reshape(-1).bool()  # (B*S,)
        sample_of = torch.arange(len(seqs)).repeat_interleave(torch.tensor(lens)).to(self.device)  # (T,)
        with RouterTap(self.layout) as tap, torch.inference_mode():
            forward(self.model, ids.to(self.device), mask.to(self.device))
            w, e = tap.take(valid.to(self.device))  # (L, T, K)
            cnt, gate, ngate, wsum = device_sums(w, e, sample_of, len(seqs), self.layout.num_experts)
            self.scale.update(wsum, e)
        out = {"lens": lens, "token_ids": ids.reshape(-1)[valid].numpy().astype(np.int32),
               "cnt": cnt.cpu().numpy(), "gate": gate.cpu().numpy(), "ngate": ngate.cpu().numpy()}
        if want_routes:
            out["weights"], out["experts"] = w.cpu().numpy(), e.to(torch.int16).cpu().numpy()
        return out

    def run_batch(self, seqs: list[list[int]], first_sample_id: int,
                  loss: list[list[bool]] | None = None) -> dict[str, pa.Table]:
        """Forward one batch; return its tokens/routes tables (run_id 0). `loss`: per-sequence loss_flags, stored
        as the tokens' `loss` column."""
        b = self.forward_batch(seqs)
        sample_ids = np.repeat(np.arange(first_sample_id, first_sample_id + len(seqs), dtype=np.int32), b["lens"])
        positions = np.concatenate([np.arange(n, dtype=np.int32) for n in b["lens"]])
        tables = batch_tables(sample_ids, positions, b["token_ids"], self.layout.layers, b["weights"], b["experts"],
                              self.texts(b["token_ids"]))
        return with_loss_column(tables, loss)


def bucket_order(seqs: list[list[int]], batch_size: int, window: int = 16) -> list[int]:
    """Sample indices in batch order: within windows of `window` batches, sorted by length (less padding)."""
    span = batch_size * window
    order = []
    for start in range(0, len(seqs), span):
        idx = list(range(start, min(start + span, len(seqs))))
        order += sorted(idx, key=lambda i: -len(seqs[i]))
    return order


def _dist():
    """(rank, world) under torchrun (initialising the default process group if needed), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def record(model, tok, records: Sequence[dict], db, task: str, *, max_tokens: int = DEFAULT_MAX_TOKENS,
           seq_len: int = 2048, batch_size: int = 8, seed: int = 0, model_name: str | None = None,
           params: dict | None = None, progress: Callable[[int, int], None] | None = None,
           flush_rows: int = FLUSH_ROWS, routes: str | None = "all", progressive: bool = False,
           ingest_wait: float | None = None) -> int:
    """Record the routing of `records` through `model` as a new complete run of `task` in `db`; return its run_id.

    progress(done_tokens, total_tokens) is called after every batch. routes: 'all', 'none' or 'sample:N'.
    progressive: insert the rows into the DB while recording (single process; see staging.StagedRun.ingest_parts).
    """
    if not task:
        raise EsftError("--task must be a non-empty name")
    if batch_size < 1:
        raise EsftError(f"--batch-size must be >= 1, got {batch_size}")
    parse_routes(routes)
    moe_layout(model)  # a model without MoE layers fails before anything is written
    seqs, _, flags = choose_samples(records, tok, max_tokens, seq_len, seed, with_loss=True)
    run_params = {"max_tokens": max_tokens, "seq_len": seq_len, "seed": seed, "n_records": len(records),
                  **(params or {})}
    return record_sequences(model, tok, seqs, db, task, batch_size=batch_size, model_name=model_name,
                            params=run_params, progress=progress, flush_rows=flush_rows, routes=routes,
                            progressive=progressive, ingest_wait=ingest_wait, loss=flags)


def record_sequences(model, tok, seqs: list[list[int]], db, task: str, *, batch_size: int = 8,
                     model_name: str | None = None, params: dict | None = None,
                     progress: Callable[[int, int], None] | None = None, flush_rows: int = FLUSH_ROWS,
                     routes: str | None = "all", progressive: bool = False, ingest_wait: float | None = None,
                     loss: list[list[bool]] | None = None) -> int:
    """Record already-tokenized samples (each a list of ids, one sample each); return the new run_id.

    Sample ids are the indices into `seqs`. Under torchrun every rank calls this with the same `seqs`.
    `loss`: per-sample loss_flags (the tokens' `loss` column, for answer-token scores); None leaves it NULL.
    """
    n_route_samples = parse_routes(routes)
    rank, world = _dist()
    rec = Recorder(model, tok)
    lay = rec.layout
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or lay.family
    run_params = {"batch_size": batch_size, **(params or {}), "routes": routes or "all", "world_size": world,
                  "family": lay.family, "routing_source": sorted(set(lay.routing.values())),
                  "dropped_slots": "ids >= num_experts" + (" and weight-0 masked skip slots"
                                                           if lay.masked_zero_slots else "")}
    if lay.layer_experts and len(set(lay.layer_experts.values())) > 1:
        run_params["layer_experts"] = {str(k): v for k, v in lay.layer_experts.items()}
    if len(set(lay.layer_top_k.values())) > 1:
        run_params["layer_top_k"] = {str(k): v for k, v in lay.layer_top_k.items()}
    staged = None
    if rank == 0:
        staged = staging.StagedRun(db, task, name, lay.num_experts, lay.top_k, lay.layers, run_params,
                                 ingest_wait=ingest_wait)
    if world > 1:
        import torch.distributed as dist

        box = [staged.run_id if staged else None]
        dist.broadcast_object_list(box, src=0)
        if staged is None:
            staged = staging.StagedRun.attach(db, box[0], part_prefix=f"r{rank:04d}-")
        else:
            staged.part_prefix = "r0000-"
    mine = list(range(rank, len(seqs), world))
    order = [mine[i] for i in bucket_order([seqs[i] for i in mine], batch_size)]
    total = sum(len(seqs[i]) for i in mine)
    progressive = progressive and world == 1
    # progressive: short DB locks every ~4 M route rows (PROGRESSIVE_ROWS); else held in memory up to flush_rows
    writer = Writer(staged, min(flush_rows, PROGRESSIVE_ROWS) if progressive else flush_rows, rec.texts,
                    progressive=progressive)
    try:
        done = 0
        for start in range(0, len(order), batch_size):
            ids = order[start: start + batch_size]
            chunk = [seqs[i] for i in ids]
            with_routes = np.array([n_route_samples is None or i < n_route_samples for i in ids])
            b = rec.forward_batch(chunk, want_routes=bool(with_routes.any()))
            flags = None if loss is None else [loss[i] for i in ids]
            writer.put(_builder(b, ids, chunk, with_routes, lay.layers, rec.texts, tok, flags))
            done += sum(len(s) for s in chunk)
            if progress:
                progress(done, total)
        _pad_forwards(rec, len(seqs), len(mine), batch_size, world)
        writer.close()
        if rank == 0:
            staged.hold({"layer_stats": rec.scale.table(lay.layers)})
        else:
            staged.spill()  # rank 0 ingests every rank's parts: this rank's held tables go to Parquet
        if world > 1:
            _gather_scale(rec.scale, staged, lay.layers, rank)
        if rank == 0:
            staged.commit()
    except BaseException as e:
        writer.stop()  # before fail(): the thread must not stage or ingest after the run's rows are deleted
        if rank == 0:
            staged.fail(f"{type(e).__name__}: {e}")
        raise
    return staged.run_id


def _pad_forwards(rec: Recorder, n_samples: int, n_mine: int, batch_size: int, world: int) -> None:
    """A sharded (FSDP2) model all-gathers each layer in every forward, a collective: ranks with fewer batches than
    rank 0 (which holds the most samples) run one-token forwards, untapped and unrecorded, until the counts match."""
    if world == 1 or not hasattr(rec.model, "unshard"):  # not an FSDP2 module: every rank is independent
        return
    most = -(-len(range(0, n_samples, world)) // batch_size)
    ids = torch.full((1, 1), rec.pad_id, dtype=torch.long, device=rec.device)
    with torch.inference_mode():
        for _ in range(most - -(-n_mine // batch_size)):
            forward(rec.model, ids, torch.ones_like(ids))


def _gather_scale(scale: LayerScale, staged, layers, rank: int) -> None:
    """Every rank's layer statistics to rank 0 (staged as extra layer_stats parts, summed at ingest)."""
    import torch.distributed as dist

    if rank != 0:
        staged.stage({"layer_stats": scale.table(layers)}, part_prefix=f"r{rank:04d}-scale-")
    dist.barrier()


