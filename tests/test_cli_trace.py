"""The trace commands through the real `esft` CLI in subprocesses: help, the official reproduction, bad input."""

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esft_core.cli import build_parser
from esft_core.models.loading import REPO_ROOT, save_tiny
from esft_core.selection.scores import load_scores
from esft_core.traces.official import import_official

OFFICIAL = Path(REPO_ROOT) / "tests" / "fixtures" / "esft-official"

CONTRACT_FLAGS = {
    "record": ["--model", "--data", "--task", "--db", "--max-tokens", "--seq-len", "--batch-size", "--seed"],
    "import-official": ["LOG_DIR", "--task", "--db", "--top-k"],
    "scores": ["--db", "--task", "--metric", "--normalize", "--format", "--out"],
    "select": ["--db", "--task", "--metric", "--top-p", "--normalize", "--out", "--top-k", "--include",
               "--exclude", "--contrast", "--bootstrap"],
    "sql": ["--db", "SQL"],
    "export": ["--db", "--out", "--run", "--task"],
    "import": ["DIR", "--db", "--task"],
}


def run_parallel(*argvs: list) -> list[subprocess.CompletedProcess]:
    """Run several independent `esft` commands at once (each start imports torch: seconds on this machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, "-m", "esft_core.cli", *map(str, a)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT) for a in argvs]
    out = []
    for p, a in zip(procs, argvs, strict=True):
        stdout, stderr = p.communicate(timeout=180)
        out.append(subprocess.CompletedProcess(a, p.returncode, stdout, stderr))
    return out


def test_every_trace_command_has_help_with_contract_flags():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, flags in CONTRACT_FLAGS.items():
        text = sub.choices[name].format_help()
        assert text.startswith(f"usage: esft {name}"), name
        for flag in flags:
            assert flag in text, (name, flag)


@pytest.fixture(scope="module")
def official_db(tmp_path_factory):
    """intent imported in-process, law through the CLI (each CLI start costs seconds on this machine)."""
    db = tmp_path_factory.mktemp("cli") / "o.duckdb"
    import_official(OFFICIAL / "expert_scores" / "intent", "intent", db)
    r = subprocess.run([sys.executable, "-m", "esft_core.cli", "import-official", str(OFFICIAL / "expert_scores" /
                        "law"), "--task", "law", "--db", str(db)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("run 2 (official) of task 'law': 33 samples, 8327 tokens, 26 MoE layers (1..26), "
                               "top-6 of 64 experts")
    return db


def test_official_configs_and_summary_reproduced_byte_for_byte(official_db, tmp_path):
    out = tmp_path / "law.json"
    sel_law, sel_intent, summary, as_json = run_parallel(
        ["select", "--db", official_db, "--task", "law", "--metric", "token", "--top-p", "0.2", "--out", out],
        ["select", "--db", official_db, "--task", "intent", "--metric", "token", "--top-p", "0.2"],
        ["scores", "--db", official_db, "--task", "intent", "--format", "esft-summary"],
        ["scores", "--db", official_db, "--task", "law", "--metric", "gate", "--format", "json"])
    doc = json.loads(as_json.stdout)
    assert (doc["task"], doc["normalize"], doc["runs"], doc["n_tokens"], doc["top_k"]) == ("law", "token", [2], 8327, 6)
    ref_gate = json.loads((OFFICIAL / "expert_scores" / "law" / "summary.json").read_text())["gate_scores"]
    assert {layer: {e: round(v, 4) for e, v in row.items()} for layer, row in doc["scores"]["gate"].items()} == ref_gate
    assert sel_law.returncode == 0 and sel_law.stdout == "", sel_law.stderr
    assert out.read_bytes() == (OFFICIAL / "expert_configs" / "law.json").read_bytes()
    ref = json.loads((OFFICIAL / "expert_configs" / "intent.json").read_text())
    got = json.loads(sel_intent.stdout)
    assert all(got["experts"][layer] == ref["experts"][layer] for layer in ref["experts"])
    assert got == ref
    assert summary.stdout.rstrip("\n") == (OFFICIAL / "expert_scores" / "intent" / "summary.json").read_text()


def test_bad_input_is_one_line_and_db_untouched(official_db, tmp_path):
    before = official_db.read_bytes()
    missing = tmp_path / "missing.duckdb"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = [
        (["select", "--db", official_db, "--task", "nope", "--metric", "token", "--top-p", "0.2"],
         "unknown task 'nope'"),
        (["scores", "--db", official_db, "--task", "law", "--metric", "tokens"], "unknown metric 'tokens'"),
        (["select", "--db", official_db, "--task", "law", "--metric", "gate", "--top-p", "1.5"],
         "--top-p must be in (0, 1]"),
        (["select", "--db", missing, "--task", "law", "--metric", "gate", "--top-p", "0.1"], "does not exist"),
        (["record", "--data", empty, "--task", "t", "--db", missing], "holds no records"),
    ]
    for (args, message), r in zip(cases, run_parallel(*(c[0] for c in cases)), strict=True):
        assert r.returncode != 0, args
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert official_db.read_bytes() == before
    assert not missing.exists()


def test_record_sql_export_import_cli(tmp_path, run_esft):
    model = save_tiny(tmp_path / "tiny", "olmoe", seed=2)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i} what?"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(12)))
    parquet = tmp_path / "text.parquet"
    pq.write_table(pa.table({"text": [f"plain text number {i}" for i in range(12)]}), parquet)
    db = tmp_path / "t.duckdb"
    # two recordings into one DB at the same time: each holds the DB lock only for moments (the other retries)
    chat_run, text_run = run_parallel(
        ["record", "--model", model, "--data", chat, "--task", "chat", "--db", db, "--max-tokens", "100",
         "--seq-len", "32", "--batch-size", "4", "--quiet"],
        ["record", "--model", model, "--data", parquet, "--task", "text", "--db", db, "--max-tokens", "60",
         "--seed", "3"])
    assert chat_run.returncode == 0 and text_run.returncode == 0, chat_run.stderr + text_run.stderr
    assert re.match(r"run [12] \(record\) of task 'chat': \d+ samples", chat_run.stdout)
    assert "top-2 of 8 experts" in chat_run.stdout
    table, denied, exported = run_parallel(
        ["sql", "--db", db, "SELECT r.task, r.status, r.n_tokens >= 60 AS enough, r.layers, t.token_text "
         "FROM runs r JOIN tokens t USING (run_id) WHERE t.sample_id = 0 AND t.position < 2 ORDER BY ALL"],
        ["sql", "--db", db, f"SELECT * FROM read_parquet('{parquet}')"],
        ["export", "--db", db, "--task", "chat", "--out", tmp_path / "exp"])
    assert table.stdout.splitlines() == [
        "task | status   | enough | layers    | token_text",
        "-----+----------+--------+-----------+-----------",
        "chat | complete | True   | [0, 1, 2] | <s>       ",
        "chat | complete | True   | [0, 1, 2] | U         ",
        "text | complete | True   | [0, 1, 2] | <s>       ",
        "text | complete | True   | [0, 1, 2] | p         ",
        "(4 rows)"]
    assert denied.returncode == 2 and "disabled by configuration" in denied.stderr
    assert exported.returncode == 0 and "routes" in exported.stdout, exported.stderr
    merged = tmp_path / "merged.duckdb"
    r = run_esft("import", tmp_path / "exp", "--db", merged, "--task", "chat")
    assert r.returncode == 0, r.stderr
    r = run_esft("scores", "--db", merged, "--task", "chat", "--normalize", "sample")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 3 * 8 and set(rows[0]) == {"layer", "expert", "gate", "token"}
    orig = load_scores(db, "chat", "token", "sample")
    assert [float(x["token"]) for x in rows] == orig.values.ravel().tolist()
    assert abs(sum(float(x["token"]) for x in rows if x["layer"] == "1") - 1) < 1e-9
