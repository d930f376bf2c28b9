"""Evaluation (esft_core/evaluation/evaluate.py): batched greedy generation, losses, task metrics, `esft eval`."""

import json

import pytest
import torch

from esft_core.evaluation.evaluate import evaluate_files, generate, load_for_eval, loss_over, task_name
from esft_core.models.loading import save_tiny, tiny_moe, tiny_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    (d / "math").mkdir()
    rows = [("What is 2 plus 3?", "The answer is 5."), ("What is 10 plus 1?", "The answer is 11."),
            ("What is 4 plus 4?", "The answer is 8.")]
    with open(d / "math" / "eval.jsonl", "w") as f:
        for q, a in rows:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    with open(d / "heldout.jsonl", "w") as f:
        for t in ["Python is a programming language.", "Lists are mutable sequences."]:
            f.write(json.dumps({"text": t}) + "\n")
    return d


def test_batched_generation_equals_one_by_one_greedy():
    m, tok = tiny_moe("deepseek_v2", seed=0), tiny_tokenizer()
    prompts = ["User: hello\n\nAssistant:", "User: a much longer prompt here\n\nAssistant:", "x"]
    batched = generate(m, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(m, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    # and one-by-one equals a hand-written argmax loop
    ids = torch.tensor([[tok.bos_token_id] + tok.encode(prompts[0], add_special_tokens=False)])
    out = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(m(ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert single[0] == tok.decode(out).strip()


def test_loss_over_text_matches_manual_cross_entropy():
    m, tok = tiny_moe("deepseek_v2", seed=0), tiny_tokenizer()
    recs = [{"text": "abc def"}, {"text": "hello world, longer"}]
    total, n = 0.0, 0
    with torch.no_grad():
        for r in recs:
            ids = torch.tensor([[tok.bos_token_id] + tok.encode(r["text"], add_special_tokens=False)
                                + [tok.eos_token_id]])
            logits = m(ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    assert loss_over(m, tok, recs, batch_size=2) == pytest.approx(total / n, rel=1e-5)


def test_evaluate_files_reports_task_metric_and_general_loss(files):
    m, tok = tiny_moe("deepseek_v2", seed=0), tiny_tokenizer()
    res = evaluate_files(m, tok, [str(files / "math" / "eval.jsonl"), str(files / "heldout.jsonl")], limit=2)
    assert set(res["tasks"]) == {"math"}
    r = res["tasks"]["math"]
    assert r["n"] == 2 and 0.0 <= r["score"] <= 1.0 and r["loss"] > 0
    assert r["metric"] != "" and len(r["examples"]) == 2
    assert res["general_loss"] == res["general"][str(files / "heldout.jsonl")]["loss"] > 0
    assert task_name(files / "math" / "eval.jsonl") == "math" and task_name("data/general/heldout.jsonl") == "general"


def test_demo_metric_comes_from_the_registry():
    from esft_core.demo import tasks as demo
    from esft_core.evaluation.metrics import metric_for_task

    m = metric_for_task("math")
    assert m.name == "final_number_match"
    assert m.score(["so The answer is 12."], ["The answer is 12."]) == demo.score("math", "so The answer is 12.",
                                                                                   "The answer is 12.") == 1.0
    assert metric_for_task("intent").name == "json_fields"
    m = metric_for_task("unknown-task")
    assert m.name == "exact_match" and m.score([" x ", "y"], ["x", "x"]) == 0.5
    assert metric_for_task("unknown-task", "bleu").name == "bleu"


def test_authors_eval_format_with_offline_metric_and_a_judge_endpoint(tmp_path, capsys):
    """`esft eval` reads the authors' {"prompt", "raw_answers"} JSONL (gz, as shipped); a real local HTTP server
    stands in for an OpenAI-compatible judge."""
    import http.server
    import threading
    from pathlib import Path

    from esft_core.cli import main

    seen = []

    class Judge(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body["model"], self.headers.get("Authorization")))
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "7"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        law = Path(__file__).parent / "fixtures" / "esft-official" / "datasets" / "law_eval.jsonl.gz"
        base = save_tiny(tmp_path / "tiny")
        out = tmp_path / "eval.json"
        code = main(["eval", "--model", str(base), "--data", str(law), "--limit", "2", "--max-new-tokens", "4",
                     "--metric", "chrf", "--judge-url", f"http://127.0.0.1:{srv.server_address[1]}/v1",
                     "--judge-model", "grader", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
    finally:
        srv.shutdown()
    r = json.loads(out.read_text())["tasks"]["law"]
    assert r["n"] == 2 and r["metric"] == "chrf" and 0.0 <= r["score"] <= 1.0 and r["loss"] is None
    assert r["judge"] == {"model": "grader", "score": 0.7}
    assert len(seen) == 2 and seen[0][:2] == ("/v1/chat/completions", "grader")
    # a judge that does not answer is one clear error line, exit 2
    capsys.readouterr()
    code = main(["eval", "--model", str(base), "--data", str(law), "--limit", "1", "--max-new-tokens", "2",
                 "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "grader"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("esft eval: error: judge http://127.0.0.1:9/v1") and "\n" not in err
    code = main(["eval", "--model", str(base), "--data", str(law), "--metric", "nope"])
    assert code == 2 and "unknown metric 'nope'" in capsys.readouterr().err


def test_esft_eval_cli_with_run_dir_adapter(tmp_path, files, capsys):
    from esft_core.cli import main
    from esft_core.experts.adapters import base_fingerprint, save_adapter
    from esft_core.experts.esft import ExpertConfig, apply_esft

    base = save_tiny(tmp_path / "tiny")
    m = tiny_moe("deepseek_v2", seed=0)
    fp = base_fingerprint(m)
    cfg = ExpertConfig({1: [0]})
    apply_esft(m, cfg)
    save_adapter(m, cfg, tmp_path / "run" / "adapter", fp)
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(base), "--adapter", str(tmp_path / "run"), "--data",
                 str(files / "math" / "eval.jsonl"), str(files / "heldout.jsonl"), "--limit", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    got = json.loads(out.read_text())
    assert got["adapter_kind"] == "esft" and got["tasks"]["math"]["n"] == 2 and got["general_loss"] > 0
    # the adapter equals the base here (no training), so the scores match the base model's exactly
    base_res = evaluate_files(tiny_moe("deepseek_v2", seed=0), tiny_tokenizer(),
                              [str(files / "math" / "eval.jsonl"), str(files / "heldout.jsonl")], limit=2)
    assert got["tasks"]["math"]["loss"] == base_res["tasks"]["math"]["loss"]
    assert got["general_loss"] == base_res["general_loss"]


def test_load_for_eval_rejects_unknown_adapter_dirs(tmp_path):
    from esft_core.errors import EsftError

    (tmp_path / "junk").mkdir()
    with pytest.raises(EsftError, match="neither an ESFT adapter"):
        load_for_eval(str(save_tiny(tmp_path / "tiny")), str(tmp_path / "junk"))
