"""Task metrics registry (esft_core/evaluation/metrics.py): built-in metrics, BLEU/chrF through sacrebleu, user
registration."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from esft_core.errors import EsftError
from esft_core.evaluation import metrics


def test_builtin_metrics():
    assert metrics.get_metric("exact_match").score([" a  b ", "c"], ["a b", "d"]) == 0.5
    jm = metrics.get_metric("json_match")
    assert jm.score(['```json\n{"b": 1, "a": [2]}\n```'], ['{"a": [2], "b": 1}']) == 1.0  # fence stripped
    assert jm.score(["{not json"], ['{"a": 1}']) == 0.0
    jf = metrics.get_metric("json_fields")  # partial credit per field: intent, slots.contact, slots.status
    ref = '{"intent": "send", "slots": {"contact": "Eve", "status": "home"}}'
    wrong_contact = '{"intent": "send", "slots": {"contact": "Gia", "status": "home"}}'
    assert jf.score([wrong_contact], [ref]) == pytest.approx(2 / 3)
    assert jf.score(['{"intent": "send", "slots": {"contact": "Eve", "status": "home", "x": 1}}'], [ref]) == 0.75
    assert jf.score(['{"intent": "send"}'], [ref]) == pytest.approx(1 / 3)  # missing slots cost
    assert jf.score(["not json", "[1]"], [ref, ref]) == 0.0
    assert jf.score(['{"intent": "a", "slots": {}}'], ['{"slots": {}, "intent": "a"}']) == 1.0
    fn = metrics.get_metric("final_number_match")
    assert fn.score(["steps... The answer is 42."], ["The answer is 42."]) == 1.0
    assert fn.score(["42"], ["The answer is 42."]) == 0.0  # the reference states its answer; so must the prediction
    assert fn.score(["it costs 3.50 in total"], ["3.5"]) == 1.0
    # several references: the best one counts (the authors' raw_answers)
    assert metrics.get_metric("exact_match").score(["y"], [["x", "y"]]) == 1.0


def test_bleu_and_chrf_agree_with_sacrebleu():
    import sacrebleu

    preds, refs = ["the cat sat on the mat", "a dog"], ["the cat sat on a mat", "the dog"]
    assert metrics.get_metric("bleu").score(preds, refs) == pytest.approx(
        sacrebleu.corpus_bleu(preds, [refs]).score / 100)
    assert metrics.get_metric("chrf").score(preds, refs) == pytest.approx(
        sacrebleu.corpus_chrf(preds, [refs]).score / 100)
    same = ["the very same words here"]
    assert metrics.get_metric("bleu").score(same, same) == pytest.approx(1.0)
    assert metrics.get_metric("bleu").score(["驳回原告的诉讼请求"], ["驳回原告的诉讼请求"]) == pytest.approx(1.0)


def test_unknown_names_and_user_registration(tmp_path):
    with pytest.raises(EsftError, match="unknown metric 'nope'; choose one of bleu, chrf"):
        metrics.get_metric("nope")
    with pytest.raises(EsftError, match="unknown metric"):
        metrics.register_task("t", "nope")
    # a user's module registers a metric and a task through ESFT_METRIC_MODULES (fresh process: loaded once)
    (tmp_path / "my_metrics.py").write_text(
        "from esft_core.evaluation import metrics\n"
        "metrics.per_example('startswith', 'prediction starts with the reference', "
        "lambda p, r: float(p.startswith(r)))\n"
        "metrics.register_task('mytask', 'startswith')\n")
    code = ("from esft_core.evaluation.metrics import metric_for_task; m = metric_for_task('mytask'); "
            "print(m.name, m.score(['abc'], ['ab']), metric_for_task('math').name)")
    env = {**os.environ, "ESFT_METRIC_MODULES": "my_metrics",
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["startswith", "1.0", "final_number_match"]
