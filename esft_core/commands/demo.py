"""`esft demo-data` and `esft demo-model`: regenerate the shipped demo task data and rebuild the demo MoE."""

from __future__ import annotations

import argparse


def _data(args) -> int:
    """Generate into a temporary folder, then move into --out; a user's changed file is kept unless --force."""
    import filecmp
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from esft_core.demo import tasks
    from esft_core.errors import EsftError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EsftError(f"--out {out} exists and is not a directory")
    if args.n_train < 1 or args.n_eval < 1:
        raise EsftError(f"--n-train ({args.n_train}) and --n-eval ({args.n_eval}) must be >= 1")
    for t in args.tasks or []:
        if t not in tasks.TASKS:
            raise EsftError(f"unknown task '{t}'; choose from {', '.join(tasks.TASKS)}")
    parent = out if out.is_dir() else out.parent
    if not parent.is_dir():
        raise EsftError(f"directory {parent} for --out does not exist")
    with tempfile.TemporaryDirectory(dir=parent, prefix=".demo-data-") as tmp:
        written = tasks.write_all(Path(tmp), args.tasks, args.n_train, args.n_eval)
        rel = [Path(p).relative_to(tmp) for p in written]
        changed = [r for r in rel if (out / r).exists() and not filecmp.cmp(out / r, Path(tmp) / r, shallow=False)]
        if changed and not args.force:
            raise EsftError(f"{out / changed[0]} exists and differs from the demo data "
                            f"({len(changed)} file(s) would change); pass --force to overwrite or choose another --out")
        for r in rel:
            (out / r).parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / r, out / r)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {len(rel)} files under {out}")
    return 0


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
    p.add_argument("--force", action="store_true", help="overwrite files that differ from the demo data")
    p.set_defaults(func=_data)

    p = sub.add_parser("demo-model", help="rebuild the demo MoE: BPE tokenizer + seeded CPU pre-training",
                       description="Train the demo tokenizer and pre-train the tiny DeepSeek-V2 MoE. Extra flags "
                       "(e.g. --tiny, --steps N, --num-experts E) go to esft_core.demo.build; see "
                       "`python -m esft_core.demo.build --help`.")
    p.add_argument("--out", default="data/demo-moe", help="output folder (default: data/demo-moe)")
    p.add_argument("build_args", nargs=argparse.REMAINDER, help="flags for the build script")
    p.set_defaults(func=_model)
