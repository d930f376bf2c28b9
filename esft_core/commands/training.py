"""`esft train`, `esft eval`, `esft merge`, `esft import-adapter`: training, evaluation and adapters."""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from pathlib import Path

from esft_core.errors import EsftError
from esft_core.files import check_out, write_out
from esft_core.models.devices import add_device_flags


def _help(f) -> str:
    """A config field's help with its default (argparse formats help with %, hence the escape)."""
    default = "" if f.default is None or not isinstance(f.default, (int, float, str)) else f" (default {f.default})"
    return (f.metadata.get("help", "") + default).replace("%", "%%")


def add_config_flags(p, config_cls, choices: dict | None = None) -> None:
    """One flag per field of a config dataclass, from its type and metadata (help, metavar, choices): bools as
    --[no-]flag, lists as nargs='+', fields without a default required. Every default is None, so the dataclass's
    own default applies unless a flag is given (and `train_argv` can pass every field back)."""
    for f in fields(config_cls):
        if f.metadata.get("flag", True) is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).replace(" | None", "")  # annotations are strings (from __future__ import annotations)
        kw = {"help": _help(f), "default": None}
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        if (choices or {}).get(f.name) or f.metadata.get("choices"):
            kw["choices"] = list((choices or {}).get(f.name) or f.metadata["choices"])
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("list["):
            kw["nargs"] = "+"
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[kind]
        if f.default is MISSING and f.default_factory is MISSING:
            kw["required"] = True
        p.add_argument(flag, **kw)


def register(sub) -> None:
    from esft_core.tuning.config import TrainConfig
    from esft_core.tuning.registry import methods

    registered = methods()
    p = sub.add_parser("train", help=f"fine-tune a model: {', '.join(registered)}",
                       description="Train with one of the registered methods: "
                       + "; ".join(f"{n}: {m.help}" for n, m in registered.items()).replace("%", "%%")
                       + ". --train-shared / --train-non-expert add the paper's Table 3 modules. Writes DIR/run.json, "
                       "DIR/metrics.jsonl, DIR/checkpoints/ and DIR/adapter/.")
    add_config_flags(p, TrainConfig, choices={"method": list(registered)})
    p.add_argument("--resume", action="store_true", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model (+ adapter): task metric, eval loss, general loss",
                       description="Greedy-decode each chat file's prompts and score them with the task's metric; "
                       "text files ({\"text\"}) give the general-corpus loss.")
    p.add_argument("--model", default="demo", help="base model: 'demo', a directory or a hub id")
    p.add_argument("--adapter", metavar="DIR", help="ESFT adapter, LoRA adapter, fft checkpoint or run directory")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="eval files (chat or text JSONL)")
    p.add_argument("--out", metavar="F", help="write the JSON here instead of stdout")
    p.add_argument("--limit", type=int, default=32, help="examples per file (default 32)")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: longest reference + 16")
    p.add_argument("--seq-len", type=int, default=None,
                   help="truncate loss inputs to this length; generation keeps the last seq-len - max-new-tokens "
                   "prompt tokens (at least half of it) (default 512, at most the model's positions)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--metric", default=None, metavar="NAME",
                   help="score every task file with this metric (exact_match, json_match, final_number_match, bleu, "
                        "chrf, or one registered via ESFT_METRIC_MODULES); default: the task's own, else exact_match")
    p.add_argument("--judge-url", default=None, metavar="URL",
                   help="optional LLM judge: base URL of an OpenAI-compatible endpoint (e.g. http://host:8000/v1); "
                        "grades answers of the authors' eval files 0-10 (key: ESFT_JUDGE_API_KEY)")
    p.add_argument("--judge-model", default=None, metavar="NAME", help="model name the judge endpoint serves")
    add_device_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="merge an ESFT adapter into its base: a plain transformers checkpoint",
                       description="Write base + adapter as a checkpoint directory loadable with from_pretrained.")
    p.add_argument("--model", default="demo", help="base model the adapter was trained on")
    p.add_argument("--adapter", required=True, metavar="DIR", help="ESFT adapter directory (or run directory)")
    p.add_argument("--out", required=True, metavar="DIR", help="new checkpoint directory (must not exist)")
    add_device_flags(p, "dtype of the merge and of the written checkpoint (auto: the checkpoint's; float32 for the "
                     "CPU demo)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("import-adapter", help="convert an authors' per-expert ESFT adapter to this format",
                       description="Read *.safetensors with per-expert names (layers.L.mlp.experts.E.gate_proj."
                       "weight, ...) and expert_cfg.json; write adapter.safetensors in the fused layout.")
    p.add_argument("src", metavar="SRC", help="the authors' adapter directory (or one .safetensors file)")
    p.add_argument("--model", default="demo", help="base model (DeepSeek-V2 layout) the adapter belongs to")
    p.add_argument("--out", required=True, metavar="DIR", help="new adapter directory (must not exist)")
    add_device_flags(p, "dtype of the written adapter (auto: the base checkpoint's; float32 for the CPU demo)")
    p.set_defaults(func=cmd_import_adapter)


def cmd_train(args) -> int:
    _quiet()
    from esft_core.tuning.config import TrainConfig
    from esft_core.tuning.train import run_training

    kwargs = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(TrainConfig)} and v is not None}
    cfg = TrainConfig(**kwargs)
    if args.seq_len is None:  # the default 512, or the model's positions when it has fewer
        from esft_core.models import limits

        limit = limits.max_positions(limits.model_config(cfg.model))
        if limit is not None and limit < cfg.seq_len:
            cfg.seq_len = limit
    run = run_training(cfg, resume=args.resume, progress=not args.no_progress)
    if run:
        print(json.dumps({k: run.get(k) for k in ("status", "method", "step", "adapter", "eval")}))
    return 0


def _adapter_dir(path: str) -> Path:
    p = Path(path)
    return p / "adapter" if (p / "adapter" / "expert_cfg.json").is_file() else p


def _fresh_out(path: str) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EsftError(f"--out {out} already exists and is not empty; choose a new directory")
    return out


def cmd_eval(args) -> int:
    _quiet()
    from esft_core.data import read_records
    from esft_core.evaluation.evaluate import evaluate_files, load_for_eval, read_authors_eval
    from esft_core.models import limits

    for flag, v in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--max-new-tokens",
                                                                                  args.max_new_tokens)):
        if v is not None and v <= 0:
            raise EsftError(f"{flag} must be a positive integer, got {v}")
    check_out(args.out, args.force)
    for f in args.data:
        if not Path(f).is_file():
            raise EsftError(f"data file {f} does not exist")
        if read_authors_eval(f, args.limit) is None:
            read_records(f, limit=args.limit)  # every file checked (format, one kind per file) before the model loads
    judge = None
    if args.metric is not None:
        from esft_core.evaluation.metrics import get_metric, load_plugins

        load_plugins()
        get_metric(args.metric)
    if bool(args.judge_url) != bool(args.judge_model):
        raise EsftError("--judge-url and --judge-model go together")
    if args.judge_url:
        from esft_core import settings

        judge = {"url": args.judge_url, "model": args.judge_model, "api_key": settings.get("ESFT_JUDGE_API_KEY")}
    config = limits.model_config(args.model)
    if args.seq_len is None:
        args.seq_len = min(512, limits.max_positions(config) or 512)
    limits.seq_len(args.seq_len, "--seq-len", config)
    limits.memory(config, args.batch_size, args.seq_len, training=False, flags="--batch-size/--seq-len")
    device, dtype = _device_dtype(args)
    model, tok, kind = load_for_eval(args.model, args.adapter, device=device, dtype=dtype)
    result = evaluate_files(model, tok, args.data, limit=args.limit, seq_len=args.seq_len,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, metric=args.metric,
                            judge=judge)
    result = {"model": args.model, "adapter": args.adapter, "adapter_kind": kind, **result}
    write_out(json.dumps(result, indent=2, ensure_ascii=False) + "\n", args.out, args.force)
    return 0


def cmd_merge(args) -> int:
    _quiet()
    from esft_core.experts.adapters import merge_adapter
    from esft_core.models.loading import load_model

    out = _fresh_out(args.out)
    adapter = _adapter_dir(args.adapter)
    device, dtype = _device_dtype(args)
    model, tok = load_model(args.model, dtype=dtype, device=device)
    merge_adapter(model, adapter, out, tokenizer=tok)
    print(json.dumps({"merged": str(out), "adapter": str(adapter), "model": args.model}))
    return 0


def cmd_import_adapter(args) -> int:
    _quiet()
    from esft_core.experts.adapters import import_official_adapter
    from esft_core.models.loading import load_model

    out = _fresh_out(args.out)
    device, dtype = _device_dtype(args)
    model, _ = load_model(args.model, dtype=dtype, device=device)
    cfg = import_official_adapter(args.src, model, out)
    print(json.dumps({"adapter": str(out), "layers": len(cfg.experts), "experts": cfg.n_selected}))
    return 0


def _device_dtype(args):
    from esft_core.models.devices import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device, args.model)


def _quiet() -> None:
    from esft_core.tuning.train import quiet_transformers

    quiet_transformers()
