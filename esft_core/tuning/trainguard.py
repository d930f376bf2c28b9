"""Guards of a training run (`esft train`): hyper-parameter ranges, checks before step 1 (model positions, memory,
eval files, resume state), a non-finite loss stop, and a NaN-free adapter.

Kept out of esft_core/tuning/train.py (the recipe) so the recipe stays about training; train.run_training calls
`preflight` before anything is written and `check_step` after every backward pass.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from esft_core.errors import EsftError


def check_hparams(cfg) -> None:
    """Finite values in their ranges: AdamW's betas in [0, 1), lr > 0, weight decay and clip >= 0."""
    from esft_core.errors import finite

    finite(cfg.lr, "--lr", 0, None, low_open=True)
    finite(cfg.weight_decay, "--weight-decay", 0, None)
    finite(cfg.beta1, "--beta1", 0, 1, high_open=True)
    finite(cfg.beta2, "--beta2", 0, 1, high_open=True)
    finite(cfg.clip, "--clip", 0, None)




def check_resume(cfg, resume: bool) -> None:
    """--resume needs a run to resume; a complete run can be 'resumed' only with its own --steps (a no-op)."""
    if not resume:
        return
    run_file = Path(cfg.out) / "run.json"
    if not run_file.is_file():
        raise EsftError(f"--resume: {cfg.out} holds no run to resume (no run.json); drop --resume to start a new run")
    try:
        prev = json.loads(run_file.read_text())
    except json.JSONDecodeError:
        raise EsftError(f"{run_file} is unreadable; choose another --out") from None
    if prev.get("status") == "complete" and prev.get("steps") != cfg.steps:
        raise EsftError(f"--resume: {cfg.out} is a complete run of {prev.get('steps')} steps; --steps {cfg.steps} "
                        "cannot change it (no optimizer state is kept after the last step); start a new --out")


def preflight(cfg, resume: bool) -> None:
    """Everything that can be checked before the model loads and before the run directory is written."""
    from esft_core.data import read_records
    from esft_core.models import limits

    check_hparams(cfg)
    check_resume(cfg, resume)
    for f in cfg.eval_data or []:
        read_records(f, limit=cfg.eval_limit)  # a bad eval file fails now, not after training
    config = limits.model_config(cfg.model)
    limits.seq_len(cfg.seq_len, "--seq-len", config)
    limits.memory(config, cfg.batch_size, cfg.seq_len, training=True, flags="--batch-size/--seq-len")


def check_step(loss: float, grad_norm, step: int, lr: float) -> None:
    """Stop before the optimizer applies a non-finite loss or gradient (the weights stay as they were)."""
    norm = float(grad_norm)
    if not math.isfinite(loss) or not math.isfinite(norm):
        raise EsftError(f"non-finite loss {loss} (gradient norm {norm}) at step {step} with lr {lr:g}; training "
                        "stopped, no adapter written; lower --lr or check --weight-decay/--clip")


def check_finite_params(named: dict) -> None:
    """Refuse to write an adapter or checkpoint holding NaN/inf weights."""
    import torch

    bad = [n for n, p in named.items() if not bool(torch.isfinite(p.detach()).all())]
    if bad:
        raise EsftError(f"trained weights hold NaN/inf ({bad[0]}{' and more' if len(bad) > 1 else ''}); "
                        "no adapter written; lower --lr")
