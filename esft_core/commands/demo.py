"""`esft demo-data` and `esft demo-model`: regenerate the shipped demo task data and rebuild the demo MoE."""

from __future__ import annotations

import argparse


def _data(args) -> int:
    from esft_core.demo import tasks

    argv = ["--out", args.out, "--n-train", str(args.n_train), "--n-eval", str(args.n_eval)]
    if args.tasks:
        argv += ["--tasks", *args.tasks]
    return tasks.main(argv)


def _model(args) -> int:
    from esft_core.demo import build

    return build.main(["--out", args.out, *args.build_args])


def register(sub) -> None:
    p = sub.add_parser("demo-data", help="write the demo tasks (data/tasks) and general corpus (data/general)",
                       description="Deterministically (re)write the demo task splits and the general corpus.")
    p.add_argument("--out", default="data", help="data folder (default: data)")
    p.add_argument("--tasks", nargs="*", help="subset of tasks (default: all)")
    p.add_argument("--n-train", type=int, default=2000, help="train examples per task (default 2000)")
    p.add_argument("--n-eval", type=int, default=200, help="eval examples per task (default 200)")
    p.set_defaults(func=_data)

    p = sub.add_parser("demo-model", help="rebuild the demo MoE: BPE tokenizer + seeded CPU pre-training",
                       description="Train the demo tokenizer and pre-train the tiny DeepSeek-V2 MoE. Extra flags "
                       "(e.g. --tiny, --steps N, --num-experts E) go to esft_core.demo.build; see "
                       "`python -m esft_core.demo.build --help`.")
    p.add_argument("--out", default="data/demo-moe", help="output folder (default: data/demo-moe)")
    p.add_argument("build_args", nargs=argparse.REMAINDER, help="flags for the build script")
    p.set_defaults(func=_model)
