"""Parquet export and import of trace runs: merge runs recorded on many machines, query them in place.

An export is a folder with one Parquet file per table (`store.TABLES`); an import validates it against each run's
metadata before anything is written and appends its complete runs under fresh run ids. Paths never enter SQL: files
are read through Arrow datasets registered with DuckDB. `prune_runs` deletes failed runs and compacts the file.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from esft_core.errors import EsftError
from esft_core.traces import staging, store


def export_runs(db: str | Path, run_ids: list[int], out_dir: str | Path, force: bool = False) -> dict[str, int]:
    """Write the rows of `run_ids` as <out_dir>/<table>.parquet (one file per table); return row counts.

    Rows stream from DuckDB as Arrow batches into pyarrow's Parquet writer: no path is pasted into SQL. An existing
    export is overwritten only with `force`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EsftError(f"--out {out} exists and is not a directory")
    clash = [f"{name}.parquet" for name in store.TABLES if (out / f"{name}.parquet").exists()]
    if clash and not force:
        raise EsftError(f"--out {out} already holds an export ({clash[0]}); pass --force to overwrite it")
    if not out.parent.is_dir():
        raise EsftError(f"directory {out.parent} for --out does not exist")
    out.mkdir(exist_ok=True)
    counts = {}
    ids = [int(r) for r in run_ids]
    with store.reader(db) as con:
        for name in store.TABLES:
            tmp = out / f"{name}.parquet.tmp"
            batches = con.sql(f"SELECT * FROM {name} WHERE run_id IN (SELECT unnest(?::INTEGER[]))",
                              params=[ids]).to_arrow_reader(65536)
            n = 0
            with pq.ParquetWriter(tmp, batches.schema, compression="zstd") as w:
                for batch in batches:
                    w.write_batch(batch)
                    n += batch.num_rows
            os.replace(tmp, out / f"{name}.parquet")
            counts[name] = n
    return counts


IMPORT_COLUMNS = {  # the columns an export must carry, in table order
    "runs": ["run_id", "task", "model", "source", "status", "num_experts", "top_k", "layers", "n_samples",
             "n_tokens", "params", "created_at", "finished_at"],
    "samples": ["run_id", "sample_id", "n_tokens", "text"],
    "tokens": ["run_id", "sample_id", "position", "token_id", "token_text"],
    "routes": ["run_id", "sample_id", "position", "layer", "rank", "expert", "weight"],
    "expert_stats": ["run_id", "layer", "expert", "n_selected", "gate_sum", "sample_token_sum", "sample_gate_sum"],
    "expert_tokens": ["run_id", "layer", "expert", "token_id", "token_text", "n", "gate_sum"],
    "sample_expert_stats": ["run_id", "sample_id", "layer", "expert", "n_selected", "gate_sum"],
    "layer_stats": ["run_id", "layer", "n_tokens", "weight_sum", "weight_sum_min", "weight_sum_max", "n_dropped"],
    "expert_norm_stats": ["run_id", "layer", "expert", "norm_gate_sum", "sample_norm_gate_sum"],
}


def _read_export(src: Path, name: str):
    """One exported table as an Arrow dataset (lazy), its columns checked; errors name the file."""
    import pyarrow.dataset as ds

    path = src / f"{name}.parquet"
    try:
        d = ds.dataset(str(path), format="parquet")
    except (pa.ArrowInvalid, OSError) as e:
        raise EsftError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None
    missing = [c for c in IMPORT_COLUMNS[name] if c not in d.schema.names]
    if missing:
        raise EsftError(f"{path} lacks column(s) {', '.join(missing)}; expected {', '.join(IMPORT_COLUMNS[name])}")
    return d


def check_import(con, src: Path, views: dict[str, str]) -> None:
    """An export must be consistent before it is ingested: every complete run has routes and expert_stats rows,
    expert ids in [0, num_experts), layers among the run's layers, ranks in [0, top_k), counts that match."""
    bad = con.execute(f"""
        SELECT r.run_id, r.num_experts, r.top_k, r.n_tokens,
               (SELECT count(*) FROM {views['routes']} x WHERE x.run_id = r.run_id) AS n_routes,
               (SELECT count(*) FROM {views['expert_stats']} x WHERE x.run_id = r.run_id) AS n_stats,
               (SELECT count(*) FROM {views['routes']} x WHERE x.run_id = r.run_id AND (x.expert < 0
                    OR x.expert >= r.num_experts OR x.rank < 0 OR x.rank >= r.top_k
                    OR NOT list_contains(r.layers, x.layer))) AS bad_routes,
               (SELECT count(*) FROM {views['expert_stats']} x WHERE x.run_id = r.run_id AND (x.expert < 0
                    OR x.expert >= r.num_experts OR NOT list_contains(r.layers, x.layer))) AS bad_stats,
               (SELECT coalesce(sum(n_tokens), 0) FROM {views['samples']} x WHERE x.run_id = r.run_id) AS sample_tokens
        FROM {views['runs']} r WHERE r.status = 'complete' ORDER BY r.run_id""").fetchall()
    for run_id, n_exp, top_k, n_tokens, n_routes, n_stats, bad_routes, bad_stats, sample_tokens in bad:
        where = f"{src}: run {run_id}"
        if n_exp is None or top_k is None or n_exp < 1 or top_k < 1 or top_k > n_exp:
            raise EsftError(f"{where} has num_experts={n_exp}, top_k={top_k}; expected 1 <= top_k <= num_experts")
        if n_routes == 0 or n_stats == 0:
            raise EsftError(f"{where} is marked complete but has {n_routes} routes and {n_stats} expert_stats rows; "
                            "re-export it with `esft export`")
        if bad_routes or bad_stats:
            raise EsftError(f"{where} has {bad_routes + bad_stats} rows with an expert id outside [0, {n_exp}), a "
                            f"rank outside [0, {top_k}) or a layer not in its layers; refusing the import")
        if n_tokens != sample_tokens:
            raise EsftError(f"{where} says n_tokens={n_tokens} but its samples hold {sample_tokens} tokens")


def import_runs(db: str | Path, src_dir: str | Path, task: str | None = None) -> list[int]:
    """Append the runs of an exported folder (complete ones only) under fresh run ids; return the new ids.

    Files are read through Arrow datasets (no path in SQL) and validated before anything is written."""
    src = Path(src_dir)
    if not (src / "runs.parquet").exists():
        raise EsftError(f"{src} is not an exported trace folder (no runs.parquet)")
    # the optional tables are absent from older exports
    for name in (t for t in store.TABLES if t not in store.OPTIONAL_TABLES):
        if not (src / f"{name}.parquet").exists():
            raise EsftError(f"{src} lacks {name}.parquet")
    present = [n for n in store.TABLES if (src / f"{n}.parquet").exists()]
    data = {name: _read_export(src, name) for name in present}
    tag = uuid.uuid4().hex[:8]
    views = {name: f"imp_{name}_{tag}" for name in present}
    with store.reader(db) if Path(db).exists() else contextlib.nullcontext(duckdb.connect()) as con:
        for name in present:  # validate on a read-only connection first: a bad export never takes the write lock
            con.register(views[name], data[name])
        try:
            check_import(con, src, views)
        except duckdb.Error as e:
            raise EsftError(f"{src}: not a valid export ({str(e).splitlines()[0][:160]})") from None
    try:
        with store.transaction(db) as con:
            for name in present:
                con.register(views[name], data[name])
            base = store.next_run_id(con) - 1
            con.execute(f"CREATE TEMP TABLE idmap_{tag} AS SELECT run_id AS old, {base} + row_number() OVER "
                        f"(ORDER BY run_id) AS new FROM {views['runs']} WHERE status = 'complete'")
            new_ids = [r[0] for r in con.execute(f"SELECT new FROM idmap_{tag} ORDER BY new").fetchall()]
            if not new_ids:
                raise EsftError(f"{src} holds no complete run")
            task_sql = "?" if task else "r.task"
            con.execute(
                f"INSERT INTO runs SELECT m.new, {task_sql}, r.model, 'import', r.status, r.num_experts, r.top_k, "
                f"r.layers, r.n_samples, r.n_tokens, r.params, r.created_at, r.finished_at "
                f"FROM {views['runs']} r JOIN idmap_{tag} m ON r.run_id = m.old", [task] if task else [])
            for name in store.RUN_TABLES:
                if name not in views:
                    continue
                # BY NAME: optional columns (tokens.loss) missing from older exports stay NULL
                con.execute(f"INSERT INTO {name} BY NAME SELECT m.new::INTEGER AS run_id, t.* EXCLUDE (run_id) "
                            f"FROM {views[name]} t JOIN idmap_{tag} m ON t.run_id = m.old")
            con.execute(f"DROP TABLE idmap_{tag}")
    except duckdb.Error as e:
        raise EsftError(f"{src}: not a valid export ({str(e).splitlines()[0][:160]})") from None
    return new_ids


def prune_runs(db: str | Path) -> list[int]:
    """Delete the rows of failed runs (rolled-back recordings leave nothing, killed ones a 'failed' row), drop
    leftover staging folders and compact the file (CHECKPOINT rewrites row groups without deleted rows)."""
    with store.transaction(db) as con:
        ids = [r for (r,) in con.execute("SELECT run_id FROM runs WHERE status = 'failed' ORDER BY run_id").fetchall()]
        for name in store.TABLES:
            con.execute(f"DELETE FROM {name} WHERE run_id IN (SELECT unnest(?::INTEGER[]))", [ids])
        staging.drop_ingested(con, db)
    con = store.connect(db)
    try:
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return ids
