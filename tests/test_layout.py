"""The package layout holds: stages import only the stages below them, no import circle, subpackage __init__ files
are docstrings, the explorer is torch-free, the module paths held as strings exist, and the registries reach every
user (a method registered in one file shows in `esft train --help`, trains, and appears in the Train form)."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "esft_core"

# Each stage and the stages it may import (docs/CONTRACTS.md "Layout"). Lazy imports inside functions count too.
FOUNDATIONS = {"errors", "settings", "procs", "locks", "data", "files"}
ALLOWED = {
    "foundations": set(),
    "models": {"foundations"},
    "experts": {"foundations", "models"},
    "traces": {"foundations", "models"},
    "selection": {"foundations", "traces", "experts"},
    "evaluation": {"foundations", "models", "experts"},
    "tuning": {"foundations", "models", "experts", "evaluation"},
    "workspace": {"foundations", "models", "experts", "traces", "selection", "evaluation", "tuning"},
    "top": {"foundations", "models", "experts", "traces", "selection", "evaluation", "tuning", "workspace"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "top"  # the package itself
    if parts[1] in FOUNDATIONS:
        return "foundations"
    if parts[1] in ALLOWED:
        return parts[1]
    assert parts[1] in ("cli", "commands", "demo"), f"{mod}: a module outside every stage"
    return "top"


def imports(path: Path) -> set[str]:
    """esft_core modules `path` imports (module-level and inside functions); `from pkg import mod` → pkg.mod."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("esft_core")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("esft_core"):
            assert node.level == 0, f"{path}: relative import"
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if (CORE.parent / (sub.replace(".", "/") + ".py")).is_file()
                        or (CORE.parent / sub.replace(".", "/")).is_dir() else node.module)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in CORE.rglob("*.py")}


def test_every_import_points_to_its_stage_or_below():
    wrong = []
    for mod, deps in graph().items():
        for dep in deps:
            s, d = stage(mod), stage(dep)
            if s != d and d not in ALLOWED[s]:
                wrong.append(f"{mod} ({s}) imports {dep} ({d})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    g = graph()
    seen, stack, circles = set(), [], []

    def visit(m):
        if m in stack:
            circles.append(" -> ".join([*stack[stack.index(m):], m]))
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if d in g:
                visit(d)
        stack.pop()

    for m in sorted(g):
        visit(m)
    assert not circles, "\n".join(circles)


def test_stage_packages_are_docstrings_only():
    for init in CORE.glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init}: no docstring"
        assert len(tree.body) == 1, f"{init}: holds code (importing a stage must import nothing)"
    assert {p.parent.name for p in CORE.glob("*/__init__.py")} >= set(ALLOWED) - {"foundations", "top"}


def test_importing_the_explorer_does_not_import_torch():
    """Every explorer module and every module it imports, in a fresh interpreter: no torch (the first page of the
    app must not wait seconds for it)."""
    mods = sorted(module_name(p) for p in (REPO / "explorer").glob("*.py") if not p.name.startswith("page_"))
    page_deps = set()
    for page in (REPO / "explorer").glob("page_*.py"):  # pages are Streamlit scripts: import what they import
        page_deps |= {d for d in imports(page)} | {
            f"explorer.{a.name}" for n in ast.walk(ast.parse(page.read_text())) if isinstance(n, ast.ImportFrom)
            and n.module == "explorer" for a in n.names}
    code = ("import importlib, sys\n"
            f"for m in {sorted(set(mods) | page_deps)!r}: importlib.import_module(m)\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "False"], r.stdout
    assert "explorer.state" in mods and "esft_core.tuning.registry" in page_deps


def test_module_paths_held_as_strings_exist():
    from esft_core.evaluation import metrics
    from esft_core.tuning import registry
    from esft_core.workspace import jobs, launchers

    entries = [*launchers.IN_PROCESS_ENTRIES.values()]
    entries += [e for m in registry.methods().values() for e in (m.prepare, m.draw) if e]
    for e in entries:
        module, _, fn = e.partition(":")
        assert callable(getattr(importlib.import_module(module), fn)), e
    for mod in (jobs.RUNNER, *launchers.STANDBY_PRELOAD, *metrics.PLUGIN_MODULES):
        assert importlib.util.find_spec(mod) is not None, mod
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, fn = scripts["esft"].partition(":")
    assert callable(getattr(importlib.import_module(module), fn))
    for f in ("-m esft_core.workspace.runs", "-m esft_core.evaluation.attribution"):  # the launchers' `python -m`s
        assert f.split()[1] in Path(launchers.__file__).read_text(), f
        assert importlib.util.find_spec(f.split()[1]) is not None


TOY = '''
"""A toy training method in one file: only the LM head trains; the run writes a full checkpoint."""
from esft_core.tuning.registry import Method, register_method


def prepare(model, cfg, expert_cfg, master_dtype=None):
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("lm_head"))
    return model


register_method(Method("toy_head", "Toy head", "only the LM head (a test plugin)", "toy_method:prepare",
                       adapter="checkpoint"))
'''


@pytest.fixture
def toy_env(tmp_path, monkeypatch):
    (tmp_path / "toy_method.py").write_text(TOY)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "ESFT_METHOD_MODULES": "toy_method"}
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ESFT_METHOD_MODULES", "toy_method")
    return env


def test_a_method_registered_in_one_file_reaches_the_cli_and_trains(toy_env, tmp_path):
    def esft(*args):
        return subprocess.run([sys.executable, "-m", "esft_core.cli", *map(str, args)], env=toy_env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    h = esft("train", "--help")
    assert h.returncode == 0 and "toy_head" in h.stdout and "only the LM head" in h.stdout.replace("\n", " ")
    out = tmp_path / "run"
    r = esft("train", "--data", REPO / "data/tasks/law/train.jsonl", "--out", out, "--method", "toy_head",
             "--steps", 2, "--seq-len", 128, "--batch-size", 2, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["method"] == "toy_head"
    assert (out / "adapter" / "config.json").is_file()  # adapter="checkpoint": a full checkpoint
    bad = subprocess.run([sys.executable, "-m", "esft_core.cli", "train", "--help"], capture_output=True, text=True,
                         env={**toy_env, "ESFT_METHOD_MODULES": "no_such_module"}, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "no_such_module" in bad.stderr and "ESFT_METHOD_MODULES" in bad.stderr


def test_registered_methods_and_scores_reach_the_explorer(toy_env, tmp_path, monkeypatch, request):
    import shutil

    from explorer_support import cached_model_and_db
    from streamlit.testing.v1 import AppTest

    from esft_core.tuning import registry

    monkeypatch.setattr(registry, "_loaded", False)
    model, cached = cached_model_and_db(request.config.cache.mkdir("esft-explorer"))
    db = tmp_path / "traces.duckdb"
    shutil.copy(cached, db)
    monkeypatch.setenv("ESFT_DB", str(db))
    monkeypatch.setenv("ESFT_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("ESFT_MODEL", str(model))
    monkeypatch.setenv("ESFT_STANDBY", "0")
    monkeypatch.setenv("ESFT_AUTO_RECORD", "0")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    at.switch_page("explorer/page_select_train.py").run()
    assert not at.exception, [e.value for e in at.exception]
    method = next(s for s in at.selectbox if s.label == "Method")
    assert "toy_head" in method.options or "Toy head" in method.options, method.options
    score = next(r for r in at.radio if r.label == "Score")
    assert "gate_norm" in score.options, score.options  # every registered score, not a hand-typed list
    registry.METHODS.pop("toy_head", None)
