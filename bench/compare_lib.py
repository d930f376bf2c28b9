"""bench/compare_methods.py, the worker side: methods and their lr grids, task preparation (train / validation split,
expert configs through the real record → score → select pipeline), and the worker that trains and evaluates one
(method, lr, seed, task) run in a fresh process. The summaries and tables are in bench/compare_summary.py.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ["vanilla", "fft", "lora", "esft_token", "esft_gate", "esft_token_answer", "random_token", "random_gate"]
QUICK_METHODS = ["vanilla", "fft", "esft_token"]
# the paper's Table 3 (--table3, or --methods): ESFT-Token + shared experts, + non-expert modules, shared experts only
TABLE3_METHODS = ["vanilla", "fft", "esft_token", "esft_token_shared", "esft_token_nonexpert", "shared_only"]
EXTRA_METHODS = ["esft_token_p50", "esft_token_shared", "esft_token_nonexpert", "shared_only"]  # not in full mode
# lr grids: 3 values, 10x wide for every method, centred on the method's usual setting
# (the ESFT grids were first [3e-3, 3e-2]; the first quick run chose that grid's lower edge, so they moved down)
GRIDS = {"fft": [1e-4, 3e-4, 1e-3], "lora": [1e-3, 3e-3, 1e-2], "esft_token": [1e-3, 3e-3, 1e-2],
         "esft_gate": [1e-3, 3e-3, 1e-2], "esft_token_answer": [1e-3, 3e-3, 1e-2],
         "esft_token_p50": [1e-3, 3e-3, 1e-2],
         # + shared experts: more FFN experts of the same kind and scale as the selected ones -> ESFT's grid;
         # + non-expert modules: attention, embeddings, norms, dense MLP, head (a third of the model, the part FFT
         # adapts besides the experts) -> FFT's grid; shared experts alone: a small always-active FFN (197 k
         # parameters on the demo, ESFT-Token's 270-344 k, LoRA's 495 k) -> the ESFT / LoRA grid
         "esft_token_shared": [1e-3, 3e-3, 1e-2], "esft_token_nonexpert": [1e-4, 3e-4, 1e-3],
         "shared_only": [1e-3, 3e-3, 1e-2]}
# the paper's Fig. 5 sweeps (--sweep p / --sweep rank), each point at its method's chosen lr
P_GRID = [0.05, 0.1, 0.2, 0.35, 0.5]  # ESFT-Token top-p
RANK_GRID = [2, 4, 8, 16, 32, 64]  # LoRA rank r, alpha = 2r (the scale alpha/r of the main comparison's r = 8 kept)
SWEEP_METHOD = {"p": "esft_token", "rank": "lora"}
ABLATION_OF = {"random_token": "esft_token", "random_gate": "esft_gate"}
# expert config of each expert method: (score metric, top-p, token set)
EXPERT_CFGS = {"token": ("token", 0.2, "all"), "gate": ("gate", 0.1, "all"), "token_answer": ("token", 0.2, "answer"),
               "token_p50": ("token", 0.5, "all")}
CFG_OF = {"esft_token": "token", "esft_gate": "gate", "esft_token_answer": "token_answer", "random_token": "token",
          "random_gate": "gate", "esft_token_p50": "token_p50", "esft_token_shared": "token",
          "esft_token_nonexpert": "token"}
# what `esft train` runs for each benchmark method: (--method, extra TrainConfig fields)
TRAIN_AS = {"fft": ("fft", {}), "lora": ("lora", {}), "shared_only": ("shared", {}),
            "esft_token_shared": ("esft", {"train_shared": True}),
            "esft_token_nonexpert": ("esft", {"train_non_expert": True})}
GENERAL_EVAL, GENERAL_VAL = (0, 64), (200, 232)


# ---------------------------------------------------------------------------------------------------------------
def prepare_task(model, tok, task: str, n_val: int, n_score: int, tdir: Path, cfgs: dict | None = None) -> dict:
    """Split train into train/validation files and build the expert configs (`cfgs`, default EXPERT_CFGS: name ->
    (metric, top-p, token set)) through the real pipeline (record with loss flags → score → top-p select) on the
    first `n_score` training records."""
    from esft_core.data import read_records
    from esft_core.selection.select import select_for_task
    from esft_core.traces import record, store

    tdir.mkdir(parents=True, exist_ok=True)
    src = ROOT / "data" / "tasks" / task / "train.jsonl"
    lines = src.read_text().splitlines(keepends=True)
    paths = {"train": tdir / "train.jsonl", "val": tdir / "val.jsonl",
             "eval": ROOT / "data" / "tasks" / task / "eval.jsonl"}
    paths["train"].write_text("".join(lines[:-n_val]))
    paths["val"].write_text("".join(lines[-n_val:]))
    cfgs = EXPERT_CFGS if cfgs is None else cfgs
    if not cfgs:  # nothing to select (the rank sweep): no recording
        return {k: str(v) for k, v in paths.items()}
    db = tdir / "traces.duckdb"
    if db.exists():
        db.unlink()
    record.record(model, tok, read_records(paths["train"], limit=n_score), db, task, max_tokens=10**9, seq_len=256)
    with store.reader(db) as con:
        for name, (metric, p, tokens) in cfgs.items():
            paths[name] = tdir / f"expert_cfg_{name}.json"
            cfg = select_for_task(con, task, metric, "token", p=p, tokens=tokens).to_dict()
            paths[name].write_text(json.dumps(cfg, indent=1))
    return {k: str(v) for k, v in paths.items()}


def split_general(work: Path) -> dict[str, str]:
    lines = (ROOT / "data" / "general" / "heldout.jsonl").read_text().splitlines(keepends=True)
    out = {}
    for name, (a, b) in (("general_eval", GENERAL_EVAL), ("general_val", GENERAL_VAL)):
        out[name] = str(work / f"{name}.jsonl")
        Path(out[name]).write_text("".join(lines[a:b]))
    return out


# ---------------------------------------------------------------------------------------------------------------
def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class RssSampler:
    """Highest resident set size seen while training (sampled every 5 ms), next to the process-wide ru_maxrss."""

    def __init__(self):
        import threading

        self.peak, self.stop = _rss_now(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, _rss_now())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def per_example(model, tok, path: str, task: str, limit: int, seq_len: int) -> dict:
    """Per-example task scores (greedy generation, the task's metric) and the mean answer loss of a chat file."""
    from esft_core.data import prompt_text, read_records, reference_answer
    from esft_core.demo.tasks import score
    from esft_core.evaluation.evaluate import generate, loss_over

    recs = read_records(path, limit=limit)
    refs = [reference_answer(r["messages"]) for r in recs]
    max_new = min(256, max(len(tok.encode(r, add_special_tokens=False)) for r in refs) + 16)
    preds = generate(model, tok, [prompt_text(r["messages"]) for r in recs], max_new_tokens=max_new)
    return {"scores": [float(score(task, p, r)) for p, r in zip(preds, refs, strict=True)],
            "loss": loss_over(model, tok, recs, seq_len), "example": {"prediction": preds[0], "reference": refs[0]}}


def per_document_loss(model, tok, path: str, seq_len: int) -> list[float]:
    """Mean token loss of every document of a text file (one forward each)."""
    from esft_core.data import read_records
    from esft_core.evaluation.evaluate import loss_over

    return [loss_over(model, tok, [d], seq_len) for d in read_records(path)]


def worker(spec: dict) -> dict:
    """One method, one lr, one seed, one task, in this (fresh) process: train, measure, then evaluate."""
    import torch

    from esft_core.tuning.train import Recipe, TrainConfig, quiet_transformers

    quiet_transformers()
    torch.set_num_threads(1)
    res = {k: spec[k] for k in ("method", "task", "lr", "seed", "top_p", "lora_r") if k in spec}
    if spec["method"] == "vanilla":
        from esft_core.models.loading import load_model

        model, tok = load_model(spec["model"])
    else:
        from esft_core.experts.esft import optimizer_state_bytes

        m = spec["method"]
        method, extra = TRAIN_AS.get(m, (m.split("_")[0], {}))  # esft_token -> esft, random_gate -> random
        if spec.get("lora_r"):  # the rank sweep: alpha = 2r keeps the scale of r = 8, alpha = 16
            extra = {**extra, "lora_r": spec["lora_r"], "lora_alpha": 2 * spec["lora_r"]}
        cfg = TrainConfig(data=spec["train"], out=spec["out"], model=spec["model"], method=method,
                          experts=spec.get("experts"), steps=spec["steps"], lr=spec["lr"],
                          batch_size=spec["batch_size"], seq_len=spec["seq_len"], seed=spec["seed"], **extra)
        recipe = Recipe(cfg, progress=False)
        recipe.setup()
        res["rss_after_load"] = _rss_now()
        with RssSampler() as sampler:
            recipe.train()
        # ru_maxrss carries the parent's high-water mark over fork+exec; the sampled peak covers training alone
        res["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res["vm_hwm"] = _vm_hwm()
        res["train_peak_rss"] = sampler.peak
        res["optimizer_bytes"] = optimizer_state_bytes(recipe.opt)
        res["trainable_params"] = sum(p.numel() for p in recipe.params)
        adapter = recipe.save()
        res["adapter_bytes"] = sum(f.stat().st_size for f in adapter.rglob("*.safetensors"))
        lines = [json.loads(x) for x in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
        res["step_time"] = statistics.median(x["step_time"] for x in lines[1:] or lines)
        res["final_loss"] = lines[-1]["loss"]
        if recipe.expert_cfg is not None:
            res["experts_per_layer"] = {k: len(v) for k, v in recipe.expert_cfg.experts.items()}
        model, tok = recipe.model, recipe.tok
        if spec.get("keep_adapter") is False:
            import shutil

            shutil.rmtree(adapter, ignore_errors=True)
    model.eval()
    for split in ("val", "eval"):
        r = per_example(model, tok, spec[split], spec["task"], spec[f"{split}_limit"], spec["seq_len"])
        res[f"{split}_scores"], res[f"{split}_loss"], res[f"{split}_example"] = r["scores"], r["loss"], r["example"]
        res[f"{split}_score"] = statistics.mean(r["scores"])
        res[f"general_{split}_losses"] = per_document_loss(model, tok, spec[f"general_{split}"], spec["seq_len"])
        res[f"general_{split}_loss"] = statistics.mean(res[f"general_{split}_losses"])
    return res


def run_worker(spec: dict, timeout: float = 3600) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.time()
    script = str(Path(__file__).with_name("compare_methods.py"))
    proc = subprocess.Popen([sys.executable, script, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"worker {spec['method']}/{spec['task']} lr {spec['lr']} seed {spec['seed']} failed: "
                         f"{err.strip().splitlines()[-1:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["wall_s"] = round(time.time() - t, 1)
    return res


