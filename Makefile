# Two commands a new user needs: `make test` and `make app`. Both build .venv from scratch when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test app data demo-model lint bench install chromium clean lock test-latest

# The lock decides what is installed (every package pinned, `make lock` refreshes it); a changed lock rebuilds the venv
# from scratch, so .venv never mixes two locks. torch first: the CPU build lying on this disk (the lock pins the same
# release; anything unpinned would pull a multi-GB CUDA build).
$(STAMP): requirements.lock pyproject.toml
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $$(grep -E '^pip==' requirements.lock)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

# Debian chromium for the real-browser tests (playwright cannot download its own browser here).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$(command -v sudo >/dev/null 2>&1 && [ "$$(id -u)" != 0 ] && echo sudo); \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; }

test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

app: $(STAMP)
	$(BIN)/streamlit run app.py

# Regenerate the shipped task data and general corpus (byte-identical).
data: $(STAMP)
	$(BIN)/python -m esft_core.demo.tasks --out data

# Rebuild the demo MoE (tokenizer + pre-training, seeded; CPU).
demo-model: $(STAMP)
	$(BIN)/python -m esft_core.demo.build --out data/demo-moe

# Refresh requirements.lock from today's newest releases the ranges admit (deliberate: run `make test` after it).
lock:
	$(PY) tools/deps.py lock

# The newest releases in a throw-away venv: family, record and train tests; prints new and failing families.
test-latest:
	$(PY) tools/deps.py latest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .venv-lock .venv-latest .pytest_cache artifacts
