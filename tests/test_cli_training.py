"""`esft train|eval|merge|import-adapter` through the real CLI in subprocesses: help, contract flags, errors."""

import json

import pytest

from esft_core.models.loading import save_tiny

COMMANDS = ["train", "eval", "merge", "import-adapter"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_training_command_has_help(cmd):
    from esft_core.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[cmd]
    text = sub.format_help()
    assert text.startswith("usage: esft " + cmd) and len(text) > 200


def test_train_has_the_contract_flags():
    from esft_core.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    flags = {o for a in sub._actions for o in a.option_strings}
    assert {"--model", "--data", "--method", "--experts", "--out", "--steps", "--lr", "--batch-size", "--grad-accum",
            "--seq-len", "--weight-decay", "--clip", "--schedule", "--seed", "--save-every", "--resume",
            "--eval-data"} <= flags


def in_process(capsys, *args) -> tuple[int, str, str]:
    """The real CLI entry point (argparse, error formatting) without a new interpreter; (code, stdout, stderr)."""
    from esft_core.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = save_tiny(d / "tiny")
    with open(d / "train.jsonl", "w") as f:
        for w in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]:
            msgs = [{"role": "user", "content": f"echo {w}"}, {"role": "assistant", "content": w}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    (d / "cfg.json").write_text(json.dumps({"experts": {"1": [1], "2": [2, 3]}, "shared_experts": False,
                                            "non_expert_modules": False}))
    return d, model


def test_train_then_eval_through_the_cli(setup, tmp_path, run_esft):
    d, model = setup
    out = tmp_path / "run"
    res = run_esft("train", "--model", model, "--data", d / "train.jsonl", "--method", "esft", "--experts",
                   d / "cfg.json", "--out", out, "--steps", "3", "--seq-len", "64", "--batch-size", "2",
                   "--schedule", "cosine", "--grad-accum", "2", "--eval-data", d / "train.jsonl", "--eval-limit", "2")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["status"] == "complete" and summary["step"] == 3
    assert "esft train (esft)" in res.stderr  # tqdm progress
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["grad_accum"] == 2 and run["config"]["schedule"] == "cosine"
    ev = json.loads((out / "eval.json").read_text())
    assert ev["tasks"][d.name]["n"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in lines][0] > lines[-1]["lr"]  # cosine decays

def test_eval_in_process_on_a_trained_run(setup, tmp_path, capsys):
    d, model = setup
    out = tmp_path / "run"
    code, _, err = in_process(capsys, "train", "--model", model, "--data", d / "train.jsonl", "--method", "random",
                              "--experts", d / "cfg.json", "--out", out, "--steps", "2", "--seq-len", "64",
                              "--no-progress")
    assert code == 0, err
    code, stdout, err = in_process(capsys, "eval", "--model", model, "--adapter", out, "--data", d / "train.jsonl",
                                   "--limit", "2")
    assert code == 0, err
    got = json.loads(stdout)
    assert got["adapter_kind"] == "esft" and got["tasks"][d.name]["n"] == 2


def test_train_error_in_a_subprocess_is_one_line(setup, tmp_path, run_esft):
    d, model = setup
    res = run_esft("train", "--model", model, "--data", d / "train.jsonl", "--out", tmp_path / "out",
                   "--method", "lora", "--seq-len", "4")
    assert res.returncode == 2
    assert res.stderr.startswith("esft train: error: --seq-len 4 is too small for any example")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, err", [
    (["--method", "esft"], "--method esft needs --experts CFG"),
    (["--method", "esft", "--experts", "MISSING"], "expert config MISSING does not exist"),
    (["--method", "fft", "--data", "BAD"], "BAD line 1: invalid JSON"),
    (["--method", "fft", "--steps", "-1"], "--steps must be positive"),
])
def test_train_errors_are_one_line(setup, tmp_path, capsys, args, err):
    d, model = setup
    (tmp_path / "BAD").write_text("{not json\n")
    args = [a.replace("MISSING", str(tmp_path / "none.json")).replace("BAD", str(tmp_path / "BAD")) for a in args]
    err = err.replace("MISSING", str(tmp_path / "none.json")).replace("BAD", str(tmp_path / "BAD"))
    base = ["train", "--model", model, "--data", d / "train.jsonl", "--out", tmp_path / "out"]
    code, _, stderr = in_process(capsys, *base, *args)
    assert code == 2 and stderr.startswith("esft train: error: ") and err in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_eval_and_merge_and_import_errors(setup, tmp_path, capsys):
    d, model = setup
    code, _, err = in_process(capsys, "eval", "--model", model, "--data", tmp_path / "nope.jsonl")
    assert code == 2 and err == f"esft eval: error: data file {tmp_path / 'nope.jsonl'} does not exist\n"
    code, _, err = in_process(capsys, "merge", "--model", model, "--adapter", tmp_path, "--out", tmp_path / "m")
    assert code == 2 and "is not an ESFT adapter" in err and len(err.splitlines()) == 1
    other = save_tiny(tmp_path / "other", seed=5)
    code, _, err = in_process(capsys, "import-adapter", tmp_path / "missing", "--model", other, "--out",
                              tmp_path / "imp")
    assert code == 2 and err == f"esft import-adapter: error: adapter {tmp_path / 'missing'} does not exist\n"
    assert not (tmp_path / "m").exists() and not (tmp_path / "imp").exists()


@pytest.mark.parametrize("cmd", ["record", *COMMANDS])
def test_device_and_dtype_flags_everywhere_and_bad_device_is_one_line(cmd, capsys, tmp_path):
    from esft_core.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[cmd]
    flags = {o for a in sub._actions for o in a.option_strings}
    assert {"--device", "--dtype"} <= flags
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    args = {"record": ["--data", data, "--task", "t", "--db", tmp_path / "t.duckdb"],
            "train": ["--data", data, "--method", "fft", "--out", tmp_path / "o"],
            "eval": ["--data", data], "merge": ["--adapter", tmp_path, "--out", tmp_path / "o"],
            "import-adapter": [tmp_path, "--out", tmp_path / "o"]}[cmd]
    code, out, err = in_process(capsys, cmd, *args, "--device", "cuda")
    assert code == 2 and "--device cuda: CUDA is not available" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # nothing written
