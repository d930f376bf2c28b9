"""`esft` trace commands: record, import-official, scores, select, sql, export, import.

Every command validates its arguments before touching the database, prints results to stdout (or --out, written
atomically), and reports errors as one line on stderr (EsftError → exit 2 in esft_core/cli.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

from esft_core.errors import EsftError
from esft_core.files import check_out, write_out

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # Accelerate's placement strategies


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Usage errors as a single stderr line (argparse prints the usage block otherwise)."""

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    parser.error = error
    return parser


def _model_args(p) -> None:
    p.add_argument("--model", default=None, help="use only this model's runs (needed when the task has runs of "
                                                  "several models)")
    p.add_argument("--pool-models", action="store_true",
                   help="allow pooling runs of different models (their experts differ; rarely meaningful)")


def _runs_arg(p):
    p.add_argument("--run", type=int, action="append", metavar="ID",
                   help="use only this complete run (repeatable; default: every complete run of the task)")


# -- record ---------------------------------------------------------------------------------------------------
def cmd_record(args) -> int:
    import torch

    from esft_core.data import read_records
    from esft_core.models.loading import load_model, moe_layout
    from esft_core.traces.record import parse_routes, record

    if args.max_tokens < 1 or args.batch_size < 1:
        raise EsftError(f"--max-tokens ({args.max_tokens}) and --batch-size ({args.batch_size}) must be >= 1")
    if not args.ingest_wait >= 0:
        raise EsftError(f"--ingest-wait must be >= 0 seconds, got {args.ingest_wait}")
    parse_routes(args.routes)
    if args.device_map is not None and args.device_map not in DEVICE_MAPS:
        raise EsftError(f"--device-map: expected one of {', '.join(DEVICE_MAPS)}, got {args.device_map!r}")
    if args.device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise EsftError("--device-map spreads one model over this machine's GPUs; under torchrun each rank records "
                        "on its own GPU: drop --device-map or run one process")
    from esft_core.models.devices import resolve_device, resolve_dtype

    device = resolve_device(args.device)  # bad --device / --dtype fail before anything loads
    dtype = resolve_dtype(args.dtype, device, args.model)
    from esft_core.models import limits
    from esft_core.traces import store

    store.db_path(args.db)
    config = limits.model_config(args.model)  # config.json only: limits are checked before weights load
    if args.seq_len is None:
        args.seq_len = min(2048, limits.max_positions(config) or 2048)
    limits.seq_len(args.seq_len, "--seq-len", config)
    limits.memory(config, args.batch_size, args.seq_len, training=False, flags="--batch-size/--seq-len")
    records = read_records(args.data)  # bad data fails before the model loads and before the DB is touched
    if args.threads:
        torch.set_num_threads(args.threads)
    from esft_core.tuning.train import quiet_transformers

    quiet_transformers()  # no "Loading weights" bar: stderr is for our progress bar and one-line errors
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU per rank
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.load == "sharded" and world == 1:
        raise EsftError("--load sharded shards the model over torchrun's ranks; run under torchrun or drop it")
    if world > 1 and args.load != "whole":  # no rank holds the whole model: FSDP2 gathers one layer per forward
        model, tok = _sharded_for_record(args.model, dtype, device)
    else:
        model, tok = load_model(args.model, dtype=dtype, device=device, device_map=args.device_map)
    moe_layout(model)  # a dense model fails here, before anything is written
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="tok", desc=f"record {args.task}", file=sys.stderr, mininterval=0.5)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    run_id = record(model, tok, records, args.db, args.task, max_tokens=args.max_tokens, seq_len=args.seq_len,
                    batch_size=args.batch_size, seed=args.seed, model_name=str(args.model),
                    params={"data": str(Path(args.data).resolve())}, progress=progress, routes=args.routes,
                    progressive=args.progressive_ingest, ingest_wait=args.ingest_wait)
    if bar is not None:
        bar.close()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 ingested the run
        _print_run(args.db, run_id)
    return 0


def _sharded_for_record(name, dtype, device):
    """The model built on meta, fully_shard-ed and filled with this rank's slices (esft_core.models.sharded)."""
    from esft_core.models.sharded import empty_model, materialize
    from esft_core.traces.record import _dist
    from esft_core.tuning.distributed import collective_errors, shard_model

    _dist()  # the process group before the mesh
    with collective_errors("loading the model"):
        model, tok = empty_model(name, dtype)
        model = shard_model(model, device, dtype)
        missing = materialize(model, device)
        if missing:
            raise EsftError(f"{model._esft_checkpoint}: the checkpoint lacks {len(missing)} tensors of the model "
                            f"(first: {sorted(missing)[0]}); is a shard file missing or truncated?")
    return model.eval(), tok


def _print_run(db, run_id: int) -> None:
    from esft_core.traces import store

    with store.reader(db) as con:
        task, src, n_s, n_t, layers, k, e = con.execute(
            "SELECT task, source, n_samples, n_tokens, layers, top_k, num_experts FROM runs WHERE run_id = ?",
            [run_id]).fetchone()
    print(f"run {run_id} ({src}) of task '{task}': {n_s} samples, {n_t} tokens, {len(layers)} MoE layers "
          f"({layers[0]}..{layers[-1]}), top-{k} of {e} experts → {db}")


# -- import-official ------------------------------------------------------------------------------------------
def cmd_import_official(args) -> int:
    from esft_core.traces.official import import_official

    run_id = import_official(args.log_dir, args.task, args.db, top_k=args.top_k, num_experts=args.num_experts,
                             model=args.model)
    _print_run(args.db, run_id)
    return 0


# -- scores ---------------------------------------------------------------------------------------------------
def cmd_scores(args) -> int:
    from esft_core.selection.scores import NORMALIZATIONS, SCORES, compute_scores, esft_summary, get_score
    from esft_core.traces import store

    metrics = [args.metric] if args.metric else [m for m in SCORES if m != "gate_norm"]  # the paper's two
    for m in metrics:
        get_score(m)
    if args.normalize not in NORMALIZATIONS:
        raise EsftError(f"unknown normalization '{args.normalize}'; choose one of {', '.join(NORMALIZATIONS)}")
    if args.format not in ("csv", "json", "esft-summary"):
        raise EsftError(f"unknown format '{args.format}'; choose csv, json or esft-summary")
    if args.tokens != "all" and args.format == "esft-summary":
        raise EsftError("--format esft-summary is the authors' all-token file; use --tokens all or another format")
    check_out(args.out, args.force)
    if args.format == "esft-summary":
        write_out(json.dumps(esft_summary(args.db, args.task, args.normalize, args.run, model=args.model,
                                            pool_models=args.pool_models)), args.out)
        return 0
    with store.reader(args.db) as con:
        sc = {m: compute_scores(con, args.task, m, args.normalize, args.run, args.model, args.pool_models,
                                args.tokens) for m in metrics}
    first = sc[metrics[0]]
    if args.format == "json":
        doc = {"task": args.task, "normalize": args.normalize, "tokens": args.tokens, "runs": first.run_ids,
               "n_tokens": first.n_tokens,
               "n_samples": first.n_samples, "top_k": first.top_k,
               "scores": {m: {str(layer): {str(e): float(v) for e, v in enumerate(s.row(layer))}
                              for layer in s.layers} for m, s in sc.items()}}
        write_out(json.dumps(doc), args.out)
        return 0
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "expert", *metrics])
    for li, layer in enumerate(first.layers):
        for e in range(first.num_experts):
            w.writerow([layer, e, *(repr(float(sc[m].values[li, e])) for m in metrics)])
    write_out(buf.getvalue(), args.out)
    return 0


def _tokens_arg(p) -> None:
    p.add_argument("--tokens", default="all", choices=["all", "answer"],
                   help="score over all tokens (default, the paper) or only the positions whose next-token "
                        "prediction is in the training loss (answer tokens; needs a recording by `esft record`)")


# -- select ---------------------------------------------------------------------------------------------------
def _round_arg(v: str) -> int | None:
    if v.lower() == "none":
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {v!r}") from None


def cmd_select(args) -> int:
    from esft_core.selection.scores import NORMALIZATIONS, get_score
    from esft_core.selection.select import check_p, select_for_task, stability
    from esft_core.traces import store

    get_score(args.metric)
    if args.normalize not in NORMALIZATIONS:
        raise EsftError(f"unknown normalization '{args.normalize}'; choose one of {', '.join(NORMALIZATIONS)}")
    if (args.top_p is None) == (args.top_k is None):
        raise EsftError("give exactly one of --top-p or --top-k")
    if args.top_p is not None:
        check_p(args.top_p)
    if args.bootstrap is not None and args.top_p is None:
        raise EsftError("--bootstrap needs --top-p (stability of the top-p selection)")
    if args.bootstrap is not None and args.metric not in ("gate", "token"):
        raise EsftError(f"--bootstrap supports --metric gate or token, not '{args.metric}'")
    if args.bootstrap is not None and args.tokens != "all":
        raise EsftError("--bootstrap supports --tokens all only")
    check_out(args.out, args.force)
    check_out(args.stability_out, args.force, "--stability-out")
    contrast = [t for spec in (args.contrast or []) for t in spec.split(",") if t]
    with store.reader(args.db) as con:
        sel = select_for_task(con, args.task, args.metric, args.normalize, args.top_p, args.top_k, args.include,
                              args.exclude, contrast, args.contrast_weight, args.round, args.run,
                              args.shared_experts, args.non_expert_modules, args.model, args.pool_models,
                              args.tokens)
        stab = (stability(con, args.task, args.metric, args.normalize, args.top_p, args.bootstrap, seed=args.seed,
                          run_ids=args.run, model=args.model, pool_models=args.pool_models)
                if args.bootstrap is not None else None)
    write_out(sel.to_json(), args.out)
    if stab is not None:
        if args.stability_out:
            write_out(json.dumps(stab), args.stability_out)
        else:
            worst = min(stab["same_selection_rate"].items(), key=lambda kv: kv[1])
            print(f"stability: {args.bootstrap} bootstrap resamples of {stab['n_samples']} samples; least stable "
                  f"layer {worst[0]} reproduces its selection in {worst[1]:.0%}; selection stops changing after "
                  f"~{stab['tokens_to_stable']['all_layers']} of {stab['n_tokens']} tokens", file=sys.stderr)
    return 0


# -- sql ------------------------------------------------------------------------------------------------------
def format_table(columns: list[str], rows: list[tuple], max_width: int = 48) -> str:
    """A plain-text table: header, rule, rows (cells cut to max_width)."""

    def cell(v) -> str:
        s = "NULL" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
        s = s.replace("\n", "\\n")
        return s if len(s) <= max_width else s[: max_width - 1] + "…"

    body = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def _json_cell(v):
    """JSON has no NaN/Infinity: non-finite floats become null; decimals numbers; other non-JSON types their text."""
    import decimal
    import math

    if isinstance(v, decimal.Decimal):
        v = float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def cmd_sql(args) -> int:
    from esft_core.traces import store
    from esft_core.traces.sqlguard import QueryInterrupted, QueryLimits, run_query, sandbox_config, spill_dir_removed

    limits = QueryLimits(timeout_s=args.timeout, memory_limit=args.memory_limit, max_rows=args.max_rows)
    if not args.query.strip().strip(";").strip():
        raise EsftError("empty query; give a SELECT statement, e.g. \"SELECT * FROM runs\"")
    try:
        with spill_dir_removed(args.db), store.reader(args.db, external_access=False,
                                                       config=sandbox_config(limits)) as con:
            cols, table, more = run_query(con, args.query, limits)
    except QueryInterrupted:
        print("esft sql: interrupted", file=sys.stderr)
        return 130
    if not cols:
        print("(no result)")
        return 0
    # by position: a query may repeat a column name
    rows = list(zip(*(table.column(i).to_pylist() for i in range(table.num_columns)), strict=True))
    if args.format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        w.writerows(rows)
        sys.stdout.write(buf.getvalue())
    elif args.format == "json":
        print(json.dumps([{c: _json_cell(v) for c, v in zip(cols, r, strict=True)} for r in rows], default=str,
                         allow_nan=False))
    else:
        print(format_table(cols, rows))
        print(f"({len(rows)} row{'s' if len(rows) != 1 else ''}{', more not shown' if more else ''})")
    return 0


# -- runs -----------------------------------------------------------------------------------------------------
def cmd_runs(args) -> int:
    from esft_core.traces import exchange, staging, store

    if args.ingest or args.prune:
        ids = staging.settle_staged(args.db)
        if ids:
            print(f"ingested staged run(s) {', '.join(map(str, ids))}", file=sys.stderr)
    if args.prune:
        size = Path(args.db).stat().st_size
        dropped = exchange.prune_runs(args.db)
        print(f"pruned {len(dropped)} failed run(s){': ' + ', '.join(map(str, dropped)) if dropped else ''}; "
              f"{size / 1e6:.1f} MB → {Path(args.db).stat().st_size / 1e6:.1f} MB", file=sys.stderr)
    staged = staging.staging_root(args.db)
    with store.reader(args.db) as con:
        rows = con.execute("SELECT run_id, task, model, source, status, n_samples, n_tokens, created_at FROM runs "
                           "ORDER BY run_id").fetchall()
    cols = ["run_id", "task", "model", "source", "status", "n_samples", "n_tokens", "created_at"]
    rows = [(*r[:4], f"{r[4]} (staged, waiting for ingest)" if r[4] == "running" and
             (staged / f"run-{r[0]}" / staging.READY).is_file() else r[4], *r[5:]) for r in rows]
    print(format_table(cols, rows))
    return 0


# -- export / import ------------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from esft_core.traces import exchange, store

    if not args.run and not args.task:
        raise EsftError("give --run ID (repeatable) or --task NAME")
    with store.reader(args.db) as con:
        ids = ([r[0] for r in store.complete_runs(con, args.task, args.run, args.model, args.pool_models)]
               if args.task else list(args.run))
        found = {r[0] for r in con.execute(
            f"SELECT run_id FROM runs WHERE status = 'complete' AND run_id IN ({', '.join(map(str, ids))})"
        ).fetchall()}
    missing = sorted(set(ids) - found)
    if missing:
        raise EsftError(f"run {missing[0]} is not a complete run in {args.db}")
    counts = exchange.export_runs(args.db, ids, args.out, force=args.force)
    print(f"exported run(s) {', '.join(map(str, ids))} to {args.out}: "
          + ", ".join(f"{n} {t}" for t, n in counts.items()))
    return 0


def cmd_import(args) -> int:
    from esft_core.traces import exchange

    ids = exchange.import_runs(args.db, args.src, args.task)
    for run_id in ids:
        _print_run(args.db, run_id)
    return 0


# -- registration ---------------------------------------------------------------------------------------------
def register(sub) -> None:
    from esft_core.selection.scores import SCORES  # the registry names the choices (duckdb is imported with it)

    """Add the trace subcommands to the `esft` parser."""

    def add(name, func, help_):
        p = _one_line_errors(sub.add_parser(name, help=help_, description=help_))
        p.set_defaults(func=func)
        return p

    p = add("record", cmd_record, "record the routing of a dataset through an MoE model into the trace DB")
    p.add_argument("--model", default="demo", help="model directory, hub id, or 'demo' (default)")
    p.add_argument("--data", required=True, help="chat JSONL, text JSONL ({\"text\": ...}) or Parquet file")
    p.add_argument("--task", required=True, help="task name the run is stored under")
    p.add_argument("--db", required=True, help="trace database (DuckDB file; created when missing)")
    p.add_argument("--max-tokens", type=int, default=131072, help="token budget (default 131072)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="truncate samples to this many tokens (default: 2048, at most the model's positions)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    from esft_core.models.devices import add_device_flags

    add_device_flags(p)
    p.add_argument("--device-map", default=None, metavar="|".join(DEVICE_MAPS),
                   help="spread a model larger than one GPU over this machine's GPUs (Accelerate's placement, passed "
                        "to from_pretrained; replaces --device; inputs go to the first layer's device)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--load", default="auto", choices=("auto", "sharded", "whole"),
                   help="under torchrun: sharded (FSDP2 on meta, each rank reads only its slices; the default) or "
                        "whole (every rank loads the whole model and records its samples with it)")
    p.add_argument("--routes", default="all",
                   help="all (default), none (aggregate-only: scores/selection/expert views, no token routes), or "
                        "sample:N (routes of the first N samples of the seeded order)")
    p.add_argument("--progressive-ingest", action="store_true",
                   help="insert rows into the DB while recording (short locks per ~4M rows; the end is quick)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ingest-wait", type=float, default=600.0, metavar="SECONDS",
                   help="when a reader holds the DB at the end, retry the ingest this long (default 600); after "
                   "that the recording stays staged and the next writer or `esft runs --ingest` ingests it")

    p = add("import-official", cmd_import_official, "import the authors' expert_weights_<layer>.txt routing logs")
    p.add_argument("log_dir", metavar="LOG_DIR", help="directory with expert_weights_<layer>.txt files")
    p.add_argument("--task", required=True, help="task name the run is stored under")
    p.add_argument("--db", required=True, help="trace database (created when missing)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: inferred; 6 for V2-Lite)")
    p.add_argument("--num-experts", type=int, default=None, help="routed experts (default: max id + 1)")
    p.add_argument("--model", default="deepseek-ai/ESFT-vanilla-lite", help="model the logs come from")

    p = add("scores", cmd_scores, "expert scores of a task (average gate score, token selection ratio)")
    p.add_argument("--db", required=True, help="trace database")
    p.add_argument("--task", required=True, help="task name")
    p.add_argument("--metric", default=None, help="gate, token or gate_norm (scale-free gate; default: gate and token)")
    p.add_argument("--normalize", default="token", help="token (authors' files) or sample (paper formula)")
    p.add_argument("--format", default="csv", help="csv, json, or esft-summary (authors' summary.json)")
    _tokens_arg(p)
    p.add_argument("--out", default=None, help="output file (default: stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    _runs_arg(p)
    _model_args(p)

    p = add("select", cmd_select, "select experts per layer → authors' expert-config JSON")
    p.add_argument("--db", required=True, help="trace database")
    p.add_argument("--task", required=True, help="task name")
    p.add_argument("--metric", required=True, help=f"a registered score: {', '.join(SCORES)}")
    p.add_argument("--top-p", type=float, default=None, help="cumulative score per layer, in (0, 1]")
    p.add_argument("--top-k", type=int, default=None, help="instead of --top-p: k experts per layer")
    p.add_argument("--normalize", default="token", help="token (default, authors' configs) or sample")
    _tokens_arg(p)
    p.add_argument("--out", default=None, help="expert config file (default: stdout)")
    p.add_argument("--include", action="append", metavar="LAYER:E1,E2",
                   help="always select these experts ('*:E' for every layer; repeatable)")
    p.add_argument("--exclude", action="append", metavar="LAYER:E1,E2", help="never select these (repeatable)")
    p.add_argument("--contrast", action="append", metavar="TASK[,TASK]",
                   help="score against these tasks' pooled scores: max(s - w*s_contrast, 0), renormalised")
    p.add_argument("--contrast-weight", type=float, default=1.0, help="w in the contrast formula (default 1)")
    p.add_argument("--round", type=_round_arg, default=4, metavar="DIGITS|none",
                   help="round scores before ranking, as the authors' summary.json (default 4)")
    p.add_argument("--bootstrap", type=int, default=None, metavar="B",
                   help="also estimate selection stability from B bootstrap resamples of the samples")
    p.add_argument("--stability-out", default=None, help="write the stability report (JSON) here")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--shared-experts", action="store_true", help="config: also train shared experts")
    p.add_argument("--non-expert-modules", action="store_true", help="config: also train non-expert modules")
    p.add_argument("--force", action="store_true", help="overwrite existing --out / --stability-out files")
    _runs_arg(p)
    _model_args(p)

    p = add("sql", cmd_sql, "run a read-only SQL query on the trace DB (no file access) and print a table")
    p.add_argument("--db", required=True, help="trace database")
    p.add_argument("query", metavar="SQL", help="the query, e.g. \"SELECT * FROM runs\"")
    p.add_argument("--format", default="table", choices=["table", "csv", "json"], help="output format")
    p.add_argument("--max-rows", type=int, default=1000, help="print at most this many rows (default 1000)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="stop the query after this many seconds (default 30); Ctrl-C also stops it")
    p.add_argument("--memory-limit", default="512MB", metavar="SIZE",
                   help="DuckDB memory limit of the query, e.g. 2GB (default 512MB; larger sorts spill to disk)")

    p = add("runs", cmd_runs, "list the runs of a trace DB; ingest queued recordings; prune failed runs")
    p.add_argument("--db", required=True, help="trace database")
    p.add_argument("--ingest", action="store_true",
                   help="ingest recordings left staged while the DB was locked, fail runs of dead recorders")
    p.add_argument("--prune", action="store_true",
                   help="also delete failed runs' rows and leftover staging folders, and compact the file")

    p = add("export", cmd_export, "export runs as Parquet files (one per table) for merging or querying in place")
    p.add_argument("--db", required=True, help="trace database")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--task", default=None, help="export every complete run of this task")
    p.add_argument("--force", action="store_true", help="overwrite an earlier export in --out")
    _runs_arg(p)
    _model_args(p)

    p = add("import", cmd_import, "import runs exported with `esft export` (new run ids; merges runs)")
    p.add_argument("src", metavar="DIR", help="directory written by `esft export`")
    p.add_argument("--db", required=True, help="trace database (created when missing)")
    p.add_argument("--task", default=None, help="store the runs under this task name")
