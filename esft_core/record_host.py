"""The recorder's host side: Arrow tables of a recorded batch and the background writer that stages them.

`batch_tables` turns one batch's routes (layer-major (L, T, K) weights and experts) into the `tokens` / `routes` /
`expert_tokens` tables; `stats_table` the device-side per-(sample, layer, expert) sums; `Writer` runs that host work
on a thread while the model computes the next batch and stages Parquet parts through `staging.StagedRun`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from esft_core import staging
from esft_core.errors import EsftError


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
                 weights: np.ndarray, experts: np.ndarray, texts: pa.Array, with_routes: np.ndarray | None = None
                 ) -> dict[str, pa.Table]:
    """Arrow tables of one batch. Per-token arrays are (T,); weights/experts (L, T, K) with expert -1 on dropped
    slots. Routes are layer-major; `with_routes` (T,) bool keeps routes of some tokens only (--routes sample:N).
    Also returns `expert_tokens`: the batch's (layer, expert, token) sums (see _token_key)."""
    n_l, n_t, k = weights.shape
    zeros = pa.repeat(pa.scalar(0, pa.int32()), n_t)
    tokens = pa.table({"run_id": zeros, "sample_id": sample_ids, "position": positions, "token_id": token_ids,
                       "token_text": texts})
    keep = experts >= 0  # (L, T, K)
    if with_routes is not None:
        keep &= with_routes[None, :, None]
    if keep.all():
        sel = slice(None)
        n = n_l * n_t * k
    else:
        sel = keep.reshape(-1)
        n = int(sel.sum())
    layer = np.repeat(np.asarray(layers, np.int16), n_t * k)[sel]
    expert = experts.reshape(-1).astype(np.int16)[sel]
    weight = weights.reshape(-1)[sel]
    routes = pa.table({
        "run_id": pa.repeat(pa.scalar(0, pa.int32()), n),
        "sample_id": np.tile(np.repeat(sample_ids, k), n_l)[sel],
        "position": np.tile(np.repeat(positions, k), n_l)[sel],
        "layer": layer,
        "rank": np.tile(np.arange(k, dtype=np.int8), n_l * n_t)[sel],
        "expert": expert,
        "weight": weight,
    })
    key = _token_key(layer, expert, np.tile(np.repeat(token_ids, k), n_l)[sel])
    sums = _sum_by_key(key, np.ones(len(key), np.float64), weight.astype(np.float64))
    return {"tokens": tokens, "routes": routes, "expert_tokens": sums}


def _token_key(layer: np.ndarray, expert: np.ndarray, token_id: np.ndarray) -> np.ndarray:
    """Per-(layer, expert, token_id) sums are keyed by one int64 (layer << 48 | expert << 32 | token_id: key order =
    (layer, expert, token) order) and summed on the writer thread with np.unique + bincount (twice as fast as a
    three-column Arrow group_by), so the ingest inserts a finished expert_tokens table."""
    return (layer.astype(np.int64) << 48) | (expert.astype(np.int64) << 32) | token_id.astype(np.int64)


def _sum_by_key(key: np.ndarray, n: np.ndarray, gate: np.ndarray) -> pa.Table:
    uniq, inv = np.unique(key, return_inverse=True)
    return pa.table({"key": uniq, "n": np.bincount(inv, weights=n, minlength=len(uniq)).astype(np.int64),
                     "gate_sum": np.bincount(inv, weights=gate, minlength=len(uniq))})


def expert_tokens_table(sums: pa.Table, texts: TokenTexts | None) -> pa.Table:
    """Decode _sum_by_key's keys into the expert_tokens staging table (sorted by layer, expert, token)."""
    k = sums["key"].to_numpy()
    token_id = (k & 0xFFFFFFFF).astype(np.int32)
    return pa.table({"run_id": pa.repeat(pa.scalar(0, pa.int32()), len(k)), "layer": (k >> 48).astype(np.int16),
                     "expert": ((k >> 32) & 0xFFFF).astype(np.int16), "token_id": token_id,
                     "token_text": texts(token_id) if texts is not None else pa.nulls(len(k), pa.string()),
                     "n": sums["n"], "gate_sum": sums["gate_sum"]})


def stats_table(first_sample_id: int, layers: list[int], cnt: np.ndarray, gate: np.ndarray,
                ngate: np.ndarray, sample_ids: np.ndarray | None = None) -> pa.Table:
    """sample_expert_stats rows (plus norm_gate_sum, staging only) of one batch from (B, L, E) sums."""
    b, li, ex = np.nonzero(cnt)
    sids = (np.arange(first_sample_id, first_sample_id + cnt.shape[0], dtype=np.int32) if sample_ids is None
            else np.asarray(sample_ids, np.int32))
    return pa.table({
        "run_id": pa.repeat(pa.scalar(0, pa.int32()), len(b)),
        "sample_id": sids[b],
        "layer": np.asarray(layers, np.int16)[li],
        "expert": ex.astype(np.int16),
        "n_selected": cnt[b, li, ex].astype(np.int32),
        "gate_sum": gate[b, li, ex],
        "norm_gate_sum": ngate[b, li, ex],
    })


class Writer:
    """A background thread that turns forward results into staged Parquet parts while the model runs on.

    `expert_tokens` partial sums are not staged per flush: they are merged into one running per-(layer, expert,
    token) table, staged once at close() sorted and with token texts, so the final ingest is a plain INSERT.
    threaded=False runs every build inline (benchmarks, to time the host work serially). progressive=True inserts
    each flushed part into the DB right away (staging.StagedRun.ingest_parts), so the final commit is short.
    """

    def __init__(self, staged: staging.StagedRun, flush_rows: int, texts: TokenTexts | None = None, depth: int = 2,
                 threaded: bool = True, progressive: bool = False):
        self.staged, self.flush_rows, self.texts, self.progressive = staged, flush_rows, texts, progressive
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.pending: dict[str, list[pa.Table]] = {}
        self.n_pending = 0
        self.token_parts: list[pa.Table] = []
        self.thread = None
        if threaded:
            self.thread = threading.Thread(target=self._run, name="esft-record-writer", daemon=True)
            self.thread.start()

    def put(self, build: Callable[[], dict[str, pa.Table]]) -> None:
        if self.error is not None:
            raise self.error
        if self.thread is None:
            self._one(build)
            if self.error is not None:
                raise self.error
        else:
            self.q.put(build)

    def _merge_tokens(self) -> None:
        if len(self.token_parts) > 1:
            t = pa.concat_tables(self.token_parts)
            self.token_parts = [_sum_by_key(t["key"].to_numpy(), t["n"].to_numpy().astype(np.float64),
                                            t["gate_sum"].to_numpy())]

    def _flush(self) -> None:
        self.token_parts += self.pending.pop("expert_tokens", [])
        self._merge_tokens()
        if self.pending:
            self.staged.stage({k: pa.concat_tables(v) for k, v in self.pending.items()})
            if self.progressive:
                self.staged.ingest_parts()
        self.pending, self.n_pending = {}, 0

    def _one(self, build) -> None:
        try:
            for name, t in build().items():
                self.pending.setdefault(name, []).append(t)
                self.n_pending += t.num_rows
            if self.n_pending >= self.flush_rows:
                self._flush()
        except BaseException as e:  # noqa: BLE001 - re-raised in the recording thread
            self.error = e

    def _run(self) -> None:
        while True:
            build = self.q.get()
            if build is None:
                break
            if self.error is None:
                self._one(build)

    def stop(self) -> None:
        """End the thread without flushing (the run failed): nothing more is staged or ingested."""
        self.error = self.error or EsftError("recording stopped")
        if self.thread is not None and self.thread.is_alive():
            self.q.put(None)
            self.thread.join()

    def close(self) -> None:
        if self.thread is not None:
            self.q.put(None)
            self.thread.join()
        if self.error is None:
            try:
                self._flush()
                if self.token_parts:
                    self.staged.stage({"expert_tokens": expert_tokens_table(self.token_parts[0], self.texts)})
                    self.token_parts = []
            except BaseException as e:  # noqa: BLE001
                self.error = e
        if self.error is not None:
            raise self.error


def with_loss_column(tables: dict[str, pa.Table], loss: list[list[bool]] | None) -> dict[str, pa.Table]:
    """Append the per-token `loss` flags (concatenated in the tokens table's sample order) to its tokens table."""
    if loss is not None and "tokens" in tables:
        tables["tokens"] = tables["tokens"].append_column("loss", pa.array(np.concatenate(loss), pa.bool_()))
    return tables


def _builder(b: dict, ids: list[int], chunk: list[list[int]], with_routes: np.ndarray, layers, texts, tok,
             loss: list[list[bool]] | None = None):
    """The host work of one batch, run on the writer thread. `loss`: the chunk's loss_flags, or None."""

    def build() -> dict[str, pa.Table]:
        lens = b["lens"]
        sample_ids = np.repeat(np.asarray(ids, np.int32), lens)
        positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
        out = {"samples": pa.table({
            "run_id": pa.repeat(pa.scalar(0, pa.int32()), len(chunk)),
            "sample_id": np.asarray(ids, np.int32),
            "n_tokens": np.array(lens, np.int32),
            "text": [tok.decode(s) if tok is not None else None for s in chunk],
        }), "sample_expert_stats": stats_table(0, layers, b["cnt"], b["gate"], b["ngate"], sample_ids=ids)}
        tt = texts(b["token_ids"])
        if "weights" in b:
            tok_routes = np.repeat(with_routes, lens)
            tabs = batch_tables(sample_ids, positions, b["token_ids"], layers, b["weights"], b["experts"], tt,
                                None if tok_routes.all() else tok_routes)
            out.update(tabs)
        else:
            out["tokens"] = pa.table({"run_id": pa.repeat(pa.scalar(0, pa.int32()), len(positions)),
                                      "sample_id": sample_ids, "position": positions, "token_id": b["token_ids"],
                                      "token_text": tt})
        return with_loss_column(out, loss)

    return build
