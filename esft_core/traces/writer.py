"""The recorder's host side: Arrow tables of a recorded batch and the background writer that stages them.

`batch_tables` turns one batch's routes (layer-major (L, T, K) weights and experts) into the `tokens` / `routes` /
`expert_tokens` tables; `stats_table` the device-side per-(sample, layer, expert) sums; `Writer` runs that host work
on a thread while the model computes the next batch and hands the tables to `staging.StagedRun` (kept in memory,
spilled as Parquet parts past `flush_rows`, or inserted into the DB as it goes with progressive ingest).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from esft_core.errors import EsftError
from esft_core.traces import staging


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
    return {"tokens": tokens, "routes": routes,
            "expert_tokens": token_sums(layers, experts, weights, token_ids, keep)}


def _token_key(layer: np.ndarray, expert: np.ndarray, token_id: np.ndarray) -> np.ndarray:
    """Per-(layer, expert, token_id) sums are keyed by one int64 (layer << 48 | expert << 32 | token_id: key order =
    (layer, expert, token) order), so partial sums merge by sorting keys (merge_token_sums)."""
    return (layer.astype(np.int64) << 48) | (expert.astype(np.int64) << 32) | token_id.astype(np.int64)


def token_sums(layers: list[int], experts: np.ndarray, weights: np.ndarray, token_ids: np.ndarray,
               keep: np.ndarray) -> pa.Table:
    """One batch's per-(layer, expert, token) count and gate sum, sorted by key (see _token_key).

    experts/weights/keep: (L, T, K); token_ids: (T,). Per layer, a dense bincount over (expert, batch-local token
    index) bins (E x distinct tokens of the batch, a few 100 k) replaces a sort of the L*T*K keys (3x faster)."""
    uniq, u = np.unique(token_ids, return_inverse=True)  # (U,), (T,): batch-local token index, in token-id order
    n_u, k = len(uniq), experts.shape[-1]
    n_e = int(experts.max(initial=-1)) + 1
    u_rows = np.repeat(u.astype(np.int64), k)  # (T*K,)
    keys, ns, gs = [], [], []
    for li, layer in enumerate(layers):
        m = keep[li].reshape(-1)  # (T*K,)
        idx = experts[li].reshape(-1).astype(np.int64) * n_u + u_rows
        idx, w = (idx, weights[li].reshape(-1)) if m.all() else (idx[m], weights[li].reshape(-1)[m])
        n = np.bincount(idx, minlength=n_e * n_u)  # (E * U,)
        nz = np.flatnonzero(n)
        g = np.bincount(idx, weights=w.astype(np.float64), minlength=n_e * n_u)[nz]
        keys.append((np.int64(layer) << 48) | ((nz // n_u) << 32) | uniq[nz % n_u].astype(np.int64))
        ns.append(n[nz].astype(np.int64))
        gs.append(g)
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    out = pa.table({"key": key, "n": np.concatenate(ns) if ns else np.zeros(0, np.int64),
                    "gate_sum": np.concatenate(gs) if gs else np.zeros(0)})
    return out if np.all(key[1:] > key[:-1]) else merge_token_sums([out])  # layers not ascending: sort


def merge_token_sums(parts: list[pa.Table]) -> pa.Table:
    """Sum sorted partial (key, n, gate_sum) tables into one sorted table. A stable argsort of the concatenation is
    a timsort, which merges the already sorted runs in near-linear time."""
    if len(parts) == 1 and np.all(np.diff(parts[0]["key"].to_numpy()) > 0):
        return parts[0]
    key = np.concatenate([p["key"].to_numpy() for p in parts])
    order = np.argsort(key, kind="stable")
    key = key[order]
    start = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    n = np.concatenate([p["n"].to_numpy() for p in parts])[order]
    g = np.concatenate([p["gate_sum"].to_numpy() for p in parts])[order]
    if len(start) == 0:
        return pa.table({"key": key, "n": n, "gate_sum": g})
    return pa.table({"key": key[start], "n": np.add.reduceat(n, start), "gate_sum": np.add.reduceat(g, start)})


class TokenSums:
    """Running per-(layer, expert, token) sums of a recording: sorted partial tables merged LSM-style (a new part
    merges into the previous one while that is at most twice its size), so each row is re-sorted O(log n) times."""

    def __init__(self):
        self.parts: list[pa.Table] = []

    def add(self, part: pa.Table) -> None:
        self.parts.append(part)
        while len(self.parts) > 1 and self.parts[-2].num_rows <= 2 * self.parts[-1].num_rows:
            b, a = self.parts.pop(), self.parts.pop()
            self.parts.append(merge_token_sums([a, b]))

    def total(self) -> pa.Table | None:
        return merge_token_sums(self.parts) if self.parts else None


def expert_tokens_table(sums: pa.Table, texts: TokenTexts | None) -> pa.Table:
    """Decode token_sums' keys into the expert_tokens staging table (sorted by layer, expert, token)."""
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
    """A background thread that turns forward results into Arrow tables while the model runs on, and hands them to
    `staging.StagedRun`.

    Tables stay in memory until `flush_rows` rows are pending; then they are spilled as Parquet parts (default), or
    inserted into the DB in a short transaction (progressive=True; spilled instead while a reader holds the DB). At
    close() whatever is pending is handed to the run in memory (`StagedRun.hold`): a recording of up to `flush_rows`
    rows never touches Parquet, its single ingest reads the Arrow tables directly.
    `expert_tokens` partial sums are merged on this thread (TokenSums) and handed over once at close(), sorted and
    with token texts, so the ingest is a plain INSERT. threaded=False runs every build inline (benchmarks, to time
    the host work serially).
    """

    def __init__(self, staged: staging.StagedRun, flush_rows: int, texts: TokenTexts | None = None, depth: int = 2,
                 threaded: bool = True, progressive: bool = False):
        self.staged, self.flush_rows, self.texts, self.progressive = staged, flush_rows, texts, progressive
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.pending: dict[str, list[pa.Table]] = {}
        self.n_pending = 0
        self.token_sums = TokenSums()
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

    def _take_pending(self) -> dict[str, pa.Table]:
        tables = {k: pa.concat_tables(v) for k, v in self.pending.items()}
        self.pending, self.n_pending = {}, 0
        return tables

    def _flush(self) -> None:
        tables = self._take_pending()
        if self.progressive and self.staged.insert_now(tables):
            return
        self.staged.stage(tables)

    def _one(self, build) -> None:
        try:
            for name, t in build().items():
                if name == "expert_tokens":
                    self.token_sums.add(t)
                    continue
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
                tables = self._take_pending()
                sums = self.token_sums.total()
                if sums is not None:
                    tables["expert_tokens"] = expert_tokens_table(sums, self.texts)
                self.token_sums = TokenSums()
                self.staged.hold(tables)
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
