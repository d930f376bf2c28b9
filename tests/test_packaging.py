"""Installs: the lock covers the environment, the wheel declares what it needs and runs from an empty venv.

A user with their own (CUDA) torch runs `pip install esft-explorer` or `pip install git+URL`: the wheel must carry
every module and the shipped data, and declare the runtime ranges, so that an installed `esft` works on its first
import. The last test does exactly that, for real: build the wheel, install it into a new empty venv with the lock
as constraints (pip fetches the dependencies itself, from its cache after `make test`'s install), run the CLI there.
"""

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import duckdb
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import deps  # noqa: E402

BUILD_FILES = ["pyproject.toml", "README.md", "requirements.txt", "requirements-app.txt", "requirements-dev.txt"]


def test_lock_pins_this_environment():
    """What is installed is what the lock says, package for package (a stale .venv or a hand install fails)."""
    lock = deps.parse_lock((ROOT / "requirements.lock").read_text())
    assert {"torch", "transformers", "duckdb", "streamlit", "peft", "pip"} <= lock.keys()
    installed = deps.freeze(Path(sys.executable))
    assert installed == lock, deps.diff(lock, installed)


def test_lock_satisfies_the_ranges():
    """Every range of requirements*.txt admits the locked version (the lock was made from them)."""
    from packaging.requirements import Requirement

    lock = deps.parse_lock((ROOT / "requirements.lock").read_text())
    for f in deps.RANGES:
        for line in (ROOT / f).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                req = Requirement(line)
                assert req.specifier.contains(lock[deps.normalise(req.name)], prereleases=True), (f, line)


def test_deps_report_names_new_and_failing_families(tmp_path):
    """`make test-latest`'s closing lines, on a real JUnit report of pytest."""
    t = tmp_path / "test_family.py"
    t.write_text("import pytest\n@pytest.mark.parametrize('family', ['mixtral', 'ergo', 'kolibri1_1'])\n"
                 "def test_family(family):\n    assert family == 'mixtral'\n\ndef test_other():\n    assert False\n")
    junit = tmp_path / "j.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", str(t)],
                   cwd=tmp_path, capture_output=True)
    failed = deps.failed_tests(junit)
    assert sorted(failed) == ["test_family.py::test_family[ergo]", "test_family.py::test_family[kolibri1_1]",
                              "test_family.py::test_other"]
    lines = deps.summary(["mixtral", "kolibri1_1", "old"], ["mixtral", "kolibri1_1", "ergo"], failed)
    assert lines == ["families new since the lock (1): ergo", "families gone since the lock (1): old",
                     "families failing (2): ergo (new), kolibri1_1",
                     "other tests failing (1): test_family.py::test_other"]
    assert deps.diff({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == ["  b: 2 -> 3", "  c: (none) -> 4"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the tree (the checkout stays untouched)."""
    src = tmp_path_factory.mktemp("src")
    for f in BUILD_FILES:
        shutil.copy(ROOT / f, src / f)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("esft_core", "explorer", "data"):
        shutil.copytree(ROOT / d, src / d, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out,
                        src], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("esft_explorer-*.whl")
    return whl


def test_wheel_holds_every_module_the_data_and_the_ranges(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tree = {str(p.relative_to(ROOT)) for d in ("esft_core", "explorer") for p in (ROOT / d).rglob("*.py")}
    assert tree and tree <= names, sorted(tree - names)  # a new subpackage missing from pyproject's list fails here
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert f"esft_data/demo-moe/{f}" in names
    assert "esft_data/tasks/law/train.jsonl" in names and "esft_data/general/heldout.jsonl" in names
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    msg = email.message_from_bytes(zipfile.ZipFile(wheel).read(meta))
    requires = msg.get_all("Requires-Dist")
    ranges = [ln.split("#", 1)[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    from packaging.requirements import Requirement

    key = lambda r: (deps.normalise(r.name), str(r.specifier))  # noqa: E731
    base = {key(Requirement(r)) for r in requires if "extra ==" not in r}
    assert base == {key(Requirement(r)) for r in ranges if r}
    assert ("torch", ">=2.6") in base
    assert any("streamlit" in r and 'extra == "app"' in r for r in requires)


@pytest.mark.slow
def test_wheel_installs_into_an_empty_venv_and_records_the_demo(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    # torch first from the pin (the CPU build on this disk), then the wheel with the lock as constraints
    r = subprocess.run([*pip, "torch==2.13.0"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([*pip, "-c", ROOT / "requirements.lock", wheel], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    esft = venv / "bin" / "esft"
    out = subprocess.run([venv / "bin" / "python", "-c", "import esft_core; print(esft_core.__file__)"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout
    assert str(venv) in out  # the installed copy, not the checkout
    h = subprocess.run([esft, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert h.returncode == 0 and "record" in h.stdout and "train" in h.stdout
    data = next((venv / "lib").glob("python*/site-packages/esft_data/tasks/law/train.jsonl"))
    db = tmp_path / "t.duckdb"
    r = subprocess.run([esft, "record", "--model", "demo", "--data", data, "--task", "law", "--db", db,
                        "--max-tokens", "300", "--quiet"], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with duckdb.connect(str(db), read_only=True) as con:
        status, n_tok = con.execute("SELECT status, n_tokens FROM runs").fetchone()
        n_routes = con.execute("SELECT count(*) FROM routes").fetchone()[0]
    assert status == "complete" and n_tok >= 300 and n_routes > 0
