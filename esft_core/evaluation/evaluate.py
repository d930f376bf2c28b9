"""Evaluation: task metrics by greedy generation, eval loss, and general-ability retention.

For a chat file (a task's eval split) we report the task metric (greedy decoding of the last assistant turn, scored by
the task's metric from the esft_core.evaluation.metrics registry, `--metric` to name one, exact match by default)
and the eval loss
(mean cross-entropy over answer tokens). For a text file (the general corpus' held-out split) we report the loss over
all tokens: its rise after tuning measures forgetting. Generation is batched (left padding) and bounded: `limit`
examples per file and at most `max_new_tokens` (by default the longest reference + 16 tokens). The authors' eval
format (`{"prompt", "raw_answers"}` JSONL, optionally .gz) is scored the same way against every raw answer (no loss:
it has no single target), plus an optional LLM judge (an OpenAI-compatible endpoint) for open answers.

The result (`esft eval`, run dir `eval.json`):
{"tasks": {"<task>": {"score", "metric", "loss", "n", "file"}}, "general_loss": float | null, "general": {...}}
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from esft_core.data import IGNORE_INDEX, encode_record, prompt_text, read_records, reference_answer


def task_name(path: str | Path) -> str:
    """data/tasks/<task>/eval.jsonl → <task>; any other file → its stem."""
    p = Path(path)
    return p.parent.name if p.stem in ("eval", "train", "test", "heldout") and p.parent.name else p.stem


def read_authors_eval(path: str | Path, limit: int | None = None) -> list[dict] | None:
    """The authors' eval records ({"prompt", "raw_answers"} per line, .jsonl or .jsonl.gz), or None when `path` is in
    another format."""
    import gzip
    import json

    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    out = []
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                if not isinstance(rec, dict) or "prompt" not in rec or "raw_answers" not in rec:
                    return None
                out.append({"prompt": str(rec["prompt"]), "answers": [str(a) for a in rec["raw_answers"]]})
                if limit is not None and len(out) >= limit:
                    break
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return out or None


@torch.no_grad()
def loss_over(model, tok, records: list[dict], seq_len: int = 512, batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy over label tokens (answer tokens for chats, all tokens for text)."""
    total, count = 0.0, 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    encoded = [encode_record(r, tok) for r in records]
    for i in range(0, len(encoded), batch_size):
        chunk = [(ids[:seq_len], lab[:seq_len]) for ids, lab in encoded[i : i + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T) right-padded
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (a, b) in enumerate(chunk):
            ids[j, : len(a)], labels[j, : len(b)], mask[j, : len(a)] = torch.tensor(a), torch.tensor(b), 1
        dev = next(model.parameters()).device
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, :-1].float()  # (B, T-1, V)
        target = labels[:, 1:].to(dev)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                                               reduction="sum")
        total += float(ce)
        count += int((target != IGNORE_INDEX).sum())
    return total / count if count else math.nan


def _keep_end(ids: list[int], limit: int | None, bos: int | None, stats: dict | None) -> list[int]:
    """The last `limit` tokens of `ids`, BOS kept in front."""
    if limit is None or len(ids) <= limit:
        return ids
    if stats is not None:
        stats["truncated_prompts"] = stats.get("truncated_prompts", 0) + 1
    head = [bos] if bos is not None and ids[:1] == [bos] else []
    return head + ids[len(ids) - (limit - len(head)):]


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16,
             max_prompt_tokens: int | None = None, stats: dict | None = None) -> list[str]:
    """Greedy completions of `prompts` (batched, left-padded), cut at EOS.

    max_prompt_tokens: keep only the last tokens of a longer prompt (after BOS; the question and the "Assistant:"
    cue sit at the end); `stats["truncated_prompts"]` counts them."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    outs = []
    for i in range(0, len(prompts), batch_size):
        enc = [_keep_end(([tok.bos_token_id] if tok.bos_token_id is not None else [])
                         + tok.encode(p, add_special_tokens=False), max_prompt_tokens, tok.bos_token_id, stats)
               for p in prompts[i : i + batch_size]]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), pad, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for j, e in enumerate(enc):
            ids[j, width - len(e) :], mask[j, width - len(e) :] = torch.tensor(e), 1
        dev = next(model.parameters()).device
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id)
        for row in gen[:, width:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            outs.append(tok.decode(row, skip_special_tokens=True).strip())
    return outs


def evaluate_authors_file(model, tok, path: str | Path, records: list[dict], task: str | None = None,
                          batch_size: int = 16, max_new_tokens: int | None = None, metric: str | None = None,
                          judge: dict | None = None, seq_len: int = 512) -> dict:
    """Score the authors' eval format: greedy answers to `prompt`, the task metric against every raw answer (best
    one counts), and the judge's mean grade when `judge` ({"url", "model", "api_key"}) is given."""
    from esft_core.evaluation.metrics import judge_score, metric_for_task

    task = task or task_name(path).removesuffix(".jsonl").removesuffix("_eval")
    m = metric_for_task(task, metric)
    if max_new_tokens is None:
        max_new_tokens = min(256, max(len(tok.encode(a, add_special_tokens=False)) for r in records
                                      for a in r["answers"]) + 16)
    stats = {"truncated_prompts": 0}  # same bound as chat files: a huge prompt cannot take the run down
    preds = generate(model, tok, [r["prompt"] for r in records], max_new_tokens=max_new_tokens,
                     batch_size=batch_size, max_prompt_tokens=max(seq_len // 2, seq_len - max_new_tokens), stats=stats)
    refs = [r["answers"] for r in records]
    out = {"kind": "authors", "task": task, "file": str(path), "n": len(records), "metric": m.name, **stats,
           "score": round(m.score(preds, refs), 6), "loss": None,
           "examples": [{"prediction": p, "reference": r[0]} for p, r in list(zip(preds, refs, strict=True))[:3]]}
    if judge:
        grades = [judge_score(judge["url"], judge["model"], r["prompt"], p, r["answers"][0], judge.get("api_key"))
                  for p, r in zip(preds, records, strict=True)]
        out["judge"] = {"model": judge["model"], "score": round(sum(grades) / len(grades), 6)}
    return out


def evaluate_file(model, tok, path: str | Path, task: str | None = None, limit: int | None = 32,
                  seq_len: int = 512, batch_size: int = 16, max_new_tokens: int | None = None,
                  metric: str | None = None, judge: dict | None = None) -> dict:
    """Score one file: chat → task metric + answer loss; authors' format → task metric (+ judge); text → loss."""
    authors = read_authors_eval(path, limit)
    if authors is not None:
        return evaluate_authors_file(model, tok, path, authors, task, batch_size, max_new_tokens, metric, judge,
                                     seq_len=seq_len)
    records = read_records(path, limit=limit)
    if "messages" not in records[0]:
        return {"kind": "text", "file": str(path), "n": len(records),
                "loss": round(loss_over(model, tok, records, seq_len, batch_size), 6)}
    from esft_core.evaluation.metrics import metric_for_task

    task = task or task_name(path)
    m = metric_for_task(task, metric)
    refs = [reference_answer(r["messages"]) for r in records]
    prompts = [prompt_text(r["messages"]) for r in records]
    if max_new_tokens is None:
        max_new_tokens = min(256, max(len(tok.encode(r, add_special_tokens=False)) for r in refs) + 16)
    stats = {"truncated_prompts": 0}  # prompt + answer fit seq_len: a huge sample cannot take the run down
    preds = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     max_prompt_tokens=max(seq_len // 2, seq_len - max_new_tokens), stats=stats)
    return {"kind": "chat", "task": task, "file": str(path), "n": len(records), "metric": m.name, **stats,
            "score": round(m.score(preds, refs), 6),
            "loss": round(loss_over(model, tok, records, seq_len, batch_size), 6),
            "examples": [{"prediction": p, "reference": r} for p, r in list(zip(preds, refs, strict=True))[:3]]}


def evaluate_files(model, tok, files: list[str], limit: int | None = 32, seq_len: int = 512,
                   batch_size: int = 16, max_new_tokens: int | None = None, metric: str | None = None,
                   judge: dict | None = None) -> dict:
    """Evaluate every file; chat files are keyed by task, text files feed `general_loss` (token-weighted)."""
    was_training = model.training
    model.eval()
    tasks, general = {}, {}
    for f in files:
        r = evaluate_file(model, tok, f, limit=limit, seq_len=seq_len, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, metric=metric, judge=judge)
        if r["kind"] in ("chat", "authors"):
            tasks[r.pop("task")] = r
        else:
            general[str(f)] = r
    if was_training:
        model.train()
    losses = [g["loss"] for g in general.values()]
    return {"tasks": tasks, "general_loss": round(sum(losses) / len(losses), 6) if losses else None,
            "general": general}


def load_for_eval(model_path: str, adapter: str | None = None, device=None, dtype=torch.float32):
    """(model, tokenizer, description) for a base model plus an optional adapter or run directory.

    `adapter` may be an ESFT adapter dir, a peft (LoRA) adapter dir, a full checkpoint (fft) or a run directory
    holding `adapter/`. `device` / `dtype`: where and in what precision the model runs (esft_core.models.devices).
    """
    import functools

    from esft_core.errors import EsftError
    from esft_core.models.loading import load_model

    load_model = functools.partial(load_model, dtype=dtype, device=device)

    if adapter is None:
        model, tok = load_model(model_path)
        return model, tok, "base"
    a = Path(adapter)
    if (a / "adapter").is_dir():
        a = a / "adapter"
    if not a.is_dir():
        raise EsftError(f"adapter {adapter} does not exist")
    if (a / "expert_cfg.json").is_file() and (a / "adapter.safetensors").is_file():
        from esft_core.experts.adapters import load_adapter

        model, tok = load_model(model_path)
        load_adapter(model, a)
        return model.eval(), tok, "esft"
    if (a / "adapter_config.json").is_file():
        import json
        import warnings

        from peft import PeftModel

        model, tok = load_model(model_path)
        fp = a / "base_fingerprint.json"
        if fp.is_file():
            from esft_core.experts.adapters import check_fingerprint

            check_fingerprint(json.loads(fp.read_text()), model, f"adapter {adapter}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(model, str(a))
        return model.eval(), tok, "lora"
    if (a / "config.json").is_file():
        model, tok = load_model(a)
        return model, tok, "checkpoint"
    raise EsftError(f"{adapter} is neither an ESFT adapter, a LoRA adapter, a checkpoint nor a run directory")
