"""Import the authors' routing logs (`expert_weights_<layer>.txt`) into the trace store.

Format (DeepSeek's ESFT repo, scripts/get_expert_scores.py): one file per MoE layer, numbered by decoder-layer index;
one line per sample: the K expert ids of every token, tab-separated, then two tabs, then the K gate weights of every
token, tab-separated. A line of L tokens therefore holds 2·L·K numbers and exactly 2·L·K tab characters.

Parsing is vectorised: numpy finds the line structure from byte positions (newlines, tabs, the double tab), and
pyarrow's multi-threaded CSV reader converts all numbers at once (tabs turned into newlines, so every number is one
row of a one-column CSV). Only when something is malformed do we walk the lines in Python, to name file and line.
Validation happens before the DB is opened, so a bad log directory writes nothing.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from esft_core.errors import EsftError
from esft_core.traces import store

LOG_RE = re.compile(r"^expert_weights_(\d+)\.txt(\.gz)?$")  # plain or gzip-compressed
OFFICIAL_MODEL = "deepseek-ai/ESFT-vanilla-lite"


@dataclass
class LayerLog:
    """One parsed layer file: per-sample token counts and the flat id/weight arrays, both (tokens * K,)."""

    layer: int
    path: Path
    n_ids: np.ndarray  # (samples,) ids on each line (= tokens * K)
    ids: np.ndarray  # (total_ids,) float64 as parsed; validated integral
    weights: np.ndarray  # (total_ids,) float64


def find_layer_files(log_dir: str | Path) -> dict[int, Path]:
    """{layer: path} of a log directory; a gap in the layer numbers is an error."""
    d = Path(log_dir)
    if not d.is_dir():
        raise EsftError(f"log directory {d} does not exist")
    files = {}
    for p in d.iterdir():
        m = LOG_RE.match(p.name)
        if m:
            layer = int(m.group(1))
            if layer in files:
                raise EsftError(f"{d}: layer {layer} is there twice ({files[layer].name} and {p.name})")
            files[layer] = p
    if not files:
        raise EsftError(f"{d} holds no expert_weights_<layer>.txt files")
    lo, hi = min(files), max(files)
    missing = [i for i in range(lo, hi + 1) if i not in files]
    if missing:
        raise EsftError(f"{d}: missing expert_weights_{missing[0]}.txt (layer files {lo}..{hi} expected, "
                        f"{len(missing)} missing)")
    return dict(sorted(files.items()))


def _locate_error(path: Path, text: str) -> str:
    """Slow path, only on bad input: the first malformed line of `path`, parsed the authors' way."""
    for lineno, line in enumerate(text.rstrip("\r\n").split("\n"), 1):
        line = line.rstrip("\r")
        parts = line.split("\t\t")
        if len(parts) != 2:
            return f"{path.name} line {lineno}: expected expert ids, two tabs, gate weights"
        try:
            ids = [int(x) for x in parts[0].split("\t")]
        except ValueError:
            return f"{path.name} line {lineno}: expert ids must be integers"
        try:
            ws = [float(x) for x in parts[1].split("\t")]
        except ValueError:
            return f"{path.name} line {lineno}: gate weights must be numbers"
        if len(ids) != len(ws):
            return f"{path.name} line {lineno}: {len(ids)} expert ids but {len(ws)} gate weights"
        if min(ids) < 0:
            return f"{path.name} line {lineno}: negative expert id {min(ids)}"
        if not all(np.isfinite(ws)) or min(ws) < 0:
            return f"{path.name} line {lineno}: gate weights must be finite and >= 0"
    return f"{path.name}: malformed (could not locate the line)"


def parse_layer_file(layer: int, path: Path) -> LayerLog:
    """Parse one log file without a Python loop over tokens; raise EsftError naming file and line on bad input."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a truncated stream is an EOFError
        raise EsftError(f"{path.name}: not a readable gzip file ({e})") from None
    data = raw.rstrip(b"\r\n") + b"\n"
    b = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(b == 10)  # (lines,) end of each line
    tabs = np.flatnonzero(b == 9)  # (total tabs,)
    starts = np.concatenate([[0], nl[:-1] + 1])
    # the double tab: a tab followed by a tab
    tt = tabs[:-1][np.diff(tabs) == 1]
    tt_per_line = np.diff(np.searchsorted(tt, np.concatenate([[0], nl])))
    bad = np.flatnonzero(tt_per_line != 1)
    if bad.size:
        raise EsftError(f"{path.name} line {bad[0] + 1}: expected expert ids, two tabs, gate weights")
    tt_pos = tt  # exactly one per line, in line order
    # ids: tabs in [start, tt) + 1 ; weights: tabs in (tt+1, nl) + 1
    n_ids = np.searchsorted(tabs, tt_pos) - np.searchsorted(tabs, starts) + 1
    n_w = np.searchsorted(tabs, nl) - np.searchsorted(tabs, tt_pos + 2) + 1
    bad = np.flatnonzero(n_ids != n_w)
    if bad.size:
        i = bad[0]
        raise EsftError(f"{path.name} line {i + 1}: {n_ids[i]} expert ids but {n_w[i]} gate weights")
    try:
        table = pcsv.read_csv(
            io.BytesIO(data.replace(b"\t", b"\n")),
            read_options=pcsv.ReadOptions(column_names=["v"], block_size=1 << 23),
            parse_options=pcsv.ParseOptions(ignore_empty_lines=True),
            convert_options=pcsv.ConvertOptions(column_types={"v": pa.float64()}),
        )
        values = table.column(0).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise EsftError(_locate_error(path, data.decode("utf-8", "replace"))) from None
    if values.size != 2 * int(n_ids.sum()) or np.isnan(values).any():
        raise EsftError(_locate_error(path, data.decode("utf-8", "replace")))
    # split each line's numbers into its ids (first half) and weights (second half)
    line_len = 2 * n_ids  # (lines,)
    offset_in_line = np.arange(values.size) - np.repeat(np.cumsum(line_len) - line_len, line_len)
    is_id = offset_in_line < np.repeat(n_ids, line_len)
    ids, weights = values[is_id], values[~is_id]
    if (ids != np.round(ids)).any() or (ids < 0).any() or not np.isfinite(weights).all() or (weights < 0).any():
        raise EsftError(_locate_error(path, data.decode("utf-8", "replace")))
    return LayerLog(layer, path, n_ids.astype(np.int64), ids, weights)


def infer_top_k(logs: list[LayerLog]) -> int:
    """K = the largest divisor d of gcd(ids per line) such that every group of d consecutive ids is distinct.

    A token's top-K experts are distinct; groups spanning two tokens almost never are.
    """
    g = 0
    for log in logs:
        g = gcd(g, int(np.gcd.reduce(log.n_ids)))
    for d in sorted((d for d in range(2, g + 1) if g % d == 0), reverse=True):
        grp = np.sort(logs[0].ids.reshape(-1, d), axis=1)  # (tokens, d); one layer is evidence enough
        if not (grp[:, 1:] == grp[:, :-1]).any():
            return d
    return 1


def read_logs(log_dir: str | Path, top_k: int | None = None, num_experts: int | None = None):
    """Parse and validate a whole log directory → (logs, top_k, num_experts, tokens per sample)."""
    files = find_layer_files(log_dir)
    # files parse independently; pyarrow and numpy release the GIL, so threads overlap (errors keep file order)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        logs = list(pool.map(lambda item: parse_layer_file(*item), files.items()))
    first = logs[0]
    for log in logs[1:]:
        if log.n_ids.size != first.n_ids.size:
            raise EsftError(f"{log.path.name} has {log.n_ids.size} lines but {first.path.name} has "
                            f"{first.n_ids.size} (one line per sample in every layer file)")
        diff = np.flatnonzero(log.n_ids != first.n_ids)
        if diff.size:
            i = diff[0]
            raise EsftError(f"{log.path.name} line {i + 1}: {log.n_ids[i]} expert ids but {first.path.name} "
                            f"line {i + 1} has {first.n_ids[i]} (same samples in every layer)")
    if top_k is None:
        top_k = infer_top_k(logs)
    if top_k < 1:
        raise EsftError(f"--top-k must be >= 1, got {top_k}")
    bad = np.flatnonzero(first.n_ids % top_k)
    if bad.size:
        raise EsftError(f"{first.path.name} line {bad[0] + 1}: {first.n_ids[bad[0]]} expert ids is not a multiple "
                        f"of top-k {top_k}")
    max_id = int(max(log.ids.max() for log in logs))
    if num_experts is None:
        num_experts = max_id + 1
    elif max_id >= num_experts:
        raise EsftError(f"expert id {max_id} in the logs but --num-experts is {num_experts}")
    return logs, top_k, num_experts, first.n_ids // top_k


def build_tables(logs: list[LayerLog], top_k: int, lens: np.ndarray) -> dict[str, pa.Table]:
    """Arrow tables (run_id 0) for samples and routes; routes rows layer-major, ranks by weight descending."""
    n_tok = int(lens.sum())
    sample_of_tok = np.repeat(np.arange(lens.size, dtype=np.int32), lens)  # (tokens,)
    pos_of_tok = (np.arange(n_tok) - np.repeat(np.cumsum(lens) - lens, lens)).astype(np.int32)  # (tokens,)
    per_layer = n_tok * top_k
    sample_col = np.tile(np.repeat(sample_of_tok, top_k), len(logs))  # (layers * tokens * K,)
    pos_col = np.tile(np.repeat(pos_of_tok, top_k), len(logs))
    rank_col = np.tile(np.arange(top_k, dtype=np.int8), n_tok * len(logs))
    layer_col = np.repeat(np.array([log.layer for log in logs], np.int16), per_layer)
    experts, weights = [], []
    for log in logs:
        w = log.weights.reshape(n_tok, top_k)  # (tokens, K), in the logged (unsorted) order
        order = np.argsort(-w, axis=1, kind="stable")  # rank 0 = highest gate weight
        weights.append(np.take_along_axis(w, order, axis=1).ravel())
        experts.append(np.take_along_axis(log.ids.reshape(n_tok, top_k), order, axis=1).ravel().astype(np.int16))
    routes = pa.table({
        "run_id": pa.repeat(pa.scalar(0, pa.int32()), per_layer * len(logs)),
        "sample_id": sample_col, "position": pos_col, "layer": layer_col, "rank": rank_col,
        "expert": np.concatenate(experts),
        "weight": np.concatenate(weights),  # float64 here: aggregates use the logged values exactly
    })
    samples = pa.table({
        "run_id": pa.repeat(pa.scalar(0, pa.int32()), lens.size),
        "sample_id": np.arange(lens.size, dtype=np.int32),
        "n_tokens": lens.astype(np.int32),
        "text": pa.nulls(lens.size, pa.string()),
    })
    return {"samples": samples, "routes": routes}


def import_official(log_dir: str | Path, task: str, db: str | Path, top_k: int | None = None,
                    num_experts: int | None = None, model: str = OFFICIAL_MODEL) -> int:
    """Validate and import an official log directory as one complete run of `task`; return the run id."""
    if not task:
        raise EsftError("--task must be a non-empty name")
    logs, top_k, num_experts, lens = read_logs(log_dir, top_k, num_experts)
    tables = build_tables(logs, top_k, lens)
    meta = dict(task=task, model=model, source="official", num_experts=num_experts, top_k=top_k,
                layers=[log.layer for log in logs],
                params={"log_dir": str(Path(log_dir).resolve()), "format": "esft-expert-weights"})
    return store.ingest_arrow(db, meta, tables, exact_weights=True)
