"""Shared fixtures support for the explorer tests: a tiny real MoE saved with a real tokenizer, and real trace DBs
recorded from it with the `esft record` command (in-process CLI; the jobs tests cover subprocesses)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = ("math", "intent", "law")


def make_tiny_model(out: Path) -> Path:
    """A seeded tiny DeepSeek-V2 MoE (3 decoder layers, 8 experts, top-2) with a byte-level BPE tokenizer trained on
    the shipped task data, saved so `esft record/train --model DIR` load it like any checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from esft_core.models.loading import tiny_moe

    out.mkdir(parents=True, exist_ok=True)
    texts = []
    for t in TASKS:
        with open(REPO / "data" / "tasks" / t / "train.jsonl", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= 200:
                    break
                texts += [m["content"] for m in json.loads(line)["messages"]]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.save_pretrained(out)
    model = tiny_moe("deepseek_v2", seed=0, vocab_size=len(tok))
    model.save_pretrained(out)
    return out


def record(db: Path, model: Path, tasks=TASKS, max_tokens: int = 384) -> None:
    from esft_core.cli import main

    for t in tasks:
        rc = main(["record", "--model", str(model), "--data", str(REPO / "data" / "tasks" / t / "train.jsonl"),
                   "--task", t, "--db", str(db), "--max-tokens", str(max_tokens), "--seq-len", "96",
                   "--batch-size", "8", "--quiet"])
        assert rc == 0, f"recording {t} failed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stamp() -> str:
    import hashlib

    h = hashlib.sha1()
    for f in (REPO / "esft_core" / "models.py", Path(__file__), REPO / "esft_core" / "record.py",
              REPO / "esft_core" / "store.py"):
        if f.exists():
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def cached_model_and_db(cache_root: Path) -> tuple[Path, Path]:
    """(tiny model dir, recorded trace DB) built once and kept in pytest's cache folder (rebuilt when the code that
    makes them changes). Tests copy the DB before using it."""
    import shutil

    root = Path(cache_root) / f"explorer-{_stamp()}"
    model, db = root / "tiny-moe", root / "traces.duckdb"
    if not (root / "ok").exists():
        shutil.rmtree(root, ignore_errors=True)
        make_tiny_model(model)
        record(db, model)
        (root / "ok").write_text("1")
    return model, db
