"""Task metrics, registered by name: how a generated answer is scored against its reference(s).

Built in: exact match, JSON match, final-number match ("The answer is N"), BLEU and chrF (sacrebleu, corpus level).
A task names its metric with `register_task(task, metric)` (the demo tasks do, in esft_core/demo/tasks.py); a user's
own task file uses `esft eval --metric NAME`; anything else falls back to exact match. A metric scores a whole file:
`score(predictions, references)` where each example may have several references (the authors' eval sets carry a
list `raw_answers`); per-example metrics take the best reference and average over examples.

The optional LLM judge (`judge_score`) asks an OpenAI-compatible chat endpoint to grade an answer from 0 to 10, as
the authors grade law and summary; it is off unless a URL and model are given (key: ESFT_JUDGE_API_KEY).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from esft_core.errors import EsftError


@dataclass(frozen=True)
class Metric:
    """A named metric: `corpus(preds, refs)` → score in [0, 1] over a file (refs: one list per example)."""

    name: str
    help: str
    corpus: Callable[[Sequence[str], Sequence[Sequence[str]]], float]

    def score(self, predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> float:
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        if len(refs) != len(predictions):
            raise EsftError(f"metric {self.name}: {len(predictions)} predictions for {len(refs)} references")
        if not predictions:
            return float("nan")
        return float(self.corpus(list(predictions), refs))


METRICS: dict[str, Metric] = {}
TASK_METRICS: dict[str, str] = {}
DEFAULT_METRIC = "exact_match"


def register_metric(m: Metric) -> Metric:
    METRICS[m.name] = m
    return m


def per_example(name: str, help: str, fn: Callable[[str, str], float]) -> Metric:
    """A metric from a per-example function (best reference per example, mean over examples)."""
    return register_metric(Metric(name, help, lambda preds, refs: sum(
        max(fn(p, r) for r in rs) if rs else 0.0 for p, rs in zip(preds, refs, strict=True)) / len(preds)))


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise EsftError(f"unknown metric '{name}'; choose one of {', '.join(sorted(METRICS))}")
    return METRICS[name]


def register_task(task: str, metric: str) -> None:
    """Make `metric` the metric of `task` (what `esft eval` uses for it unless --metric is given)."""
    get_metric(metric)
    TASK_METRICS[task] = metric


# Modules that register tasks/metrics when imported (the demo's tasks; a user's own via ESFT_METRIC_MODULES).
PLUGIN_MODULES = ("esft_core.demo.tasks",)
_loaded = False


def load_plugins() -> None:
    """Import the registering modules once: PLUGIN_MODULES plus the comma-separated ESFT_METRIC_MODULES."""
    global _loaded
    if _loaded:
        return
    import importlib

    from esft_core import settings

    _loaded = True
    for mod in (*PLUGIN_MODULES, *settings.metric_modules()):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise EsftError(f"cannot import metric module '{mod}' (ESFT_METRIC_MODULES): {e}") from None


def metric_for_task(task: str, override: str | None = None) -> Metric:
    """The metric of `task`: `override` (esft eval --metric), the task's registered one, else exact match."""
    load_plugins()
    return get_metric(override or TASK_METRICS.get(task, DEFAULT_METRIC))


# -- built-in metrics ----------------------------------------------------------------------------------------------
def _norm(s: str) -> str:
    return " ".join(s.strip().split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when prediction and reference agree after whitespace normalisation."""
    return float(_norm(pred) == _norm(ref))


_ANSWER = re.compile(r"answer is (-?\d+(?:\.\d+)?)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_number_match(pred: str, ref: str) -> float:
    """1.0 when the final number agrees: the one after 'The answer is' when both have it, else the last number."""
    p, r = _ANSWER.search(pred), _ANSWER.search(ref)
    if p is not None and r is not None:
        return float(p.group(1) == r.group(1))
    if r is not None:  # the reference states its answer; the prediction must too
        return 0.0
    pn, rn = _NUMBER.findall(pred), _NUMBER.findall(ref)
    return float(bool(pn) and bool(rn) and float(pn[-1]) == float(rn[-1]))


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


def json_match(pred: str, ref: str) -> float:
    """1.0 when prediction parses as JSON equal to the reference (key order, spacing and a ```json fence — which
    the authors' evaluator strips — do not matter)."""
    try:
        return float(json.loads(_FENCE.sub("", pred.strip())) == json.loads(_FENCE.sub("", ref.strip())))
    except (json.JSONDecodeError, ValueError):
        return 0.0


def _fields(obj, prefix: str = "") -> dict:
    # {"intent": "a", "slots": {"x": 1}} -> {"intent": "a", "slots.x": 1}; an empty dict stays one field
    if not isinstance(obj, dict) or (prefix and not obj):
        return {prefix: obj}
    out = {}
    for k, v in obj.items():
        out.update(_fields(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def json_fields(pred: str, ref: str) -> float:
    """Partial credit over the reference's JSON fields (nested keys flattened, e.g. intent, slots.time): matched
    fields / the larger of the two field counts, so a missing or an extra field costs as much as a wrong one; 0 when
    the prediction is not a JSON object. The intent/slot literature's per-field accuracy (`json_match`: all or
    none)."""
    try:
        p, r = (json.loads(_FENCE.sub("", x.strip())) for x in (pred, ref))
    except (json.JSONDecodeError, ValueError):
        return 0.0
    if not isinstance(p, dict) or not isinstance(r, dict):
        return float(p == r)
    fp, fr = _fields(p), _fields(r)
    return sum(1 for k, v in fr.items() if k in fp and fp[k] == v) / max(len(fp), len(fr), 1)


def _cjk(texts) -> bool:
    return any(re.search(r"[\u4e00-\u9fff]", t) for t in texts)


def _streams(refs: Sequence[Sequence[str]]) -> list[list[str]]:
    # sacrebleu wants reference streams of equal length: pad short lists with their first reference
    n = max(len(r) for r in refs)
    return [[r[i] if i < len(r) else r[0] for r in refs] for i in range(n)]


def _bleu(preds, refs) -> float:
    import sacrebleu

    tok = "zh" if _cjk([r for rs in refs for r in rs]) else "13a"
    return sacrebleu.corpus_bleu(preds, _streams(refs), tokenize=tok).score / 100.0


def _chrf(preds, refs) -> float:
    import sacrebleu

    return sacrebleu.corpus_chrf(preds, _streams(refs)).score / 100.0


per_example("exact_match", "exact match after whitespace normalisation", exact_match)
per_example("json_match", "parsed JSON equal to the reference (the authors' intent evaluation)", json_match)
per_example("json_fields", "share of the reference's JSON fields matched (intent and each slot; partial credit)",
            json_fields)
per_example("final_number_match", "final number ('The answer is N') equal", final_number_match)
register_metric(Metric("bleu", "corpus BLEU / 100 (sacrebleu; 'zh' tokenisation for Chinese)", _bleu))
register_metric(Metric("chrf", "corpus chrF / 100 (sacrebleu)", _chrf))


# -- optional LLM judge ----------------------------------------------------------------------------------------
JUDGE_PROMPT = ("You grade answers. Question:\n{prompt}\n\nReference answer:\n{reference}\n\nCandidate answer:\n"
                "{prediction}\n\nHow well does the candidate match the reference in substance? Reply with one "
                "integer from 0 (wrong) to 10 (equivalent), nothing else.")


def judge_score(url: str, model: str, prompt: str, prediction: str, reference: str, api_key: str | None = None,
                timeout: float = 60.0) -> float:
    """Ask an OpenAI-compatible chat endpoint (`url` = its base, e.g. http://host:8000/v1) to grade one answer;
    returns the grade / 10. EsftError on an unreachable endpoint or an unparsable reply."""
    body = json.dumps({"model": model, "temperature": 0, "messages": [{"role": "user", "content": JUDGE_PROMPT.format(
        prompt=prompt, reference=reference, prediction=prediction)}]}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            reply = json.loads(r.read().decode("utf-8"))
        text = reply["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise EsftError(f"judge {url}: no usable reply ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None
    m = re.search(r"\d+(?:\.\d+)?", text)
    if m is None:
        raise EsftError(f"judge {url}: reply {text[:80]!r} holds no grade")
    return min(max(float(m.group()) / 10.0, 0.0), 1.0)
