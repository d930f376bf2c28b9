# Two commands a new user needs: `make test` and `make app`. Both build .venv from scratch when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test app data demo-model lint bench install chromium clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU build lying on this disk. Anything unpinned would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
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
	$(BIN)/streamlit run app.py --server.headless true

# Regenerate the shipped task data and general corpus (byte-identical).
data: $(STAMP)
	$(BIN)/python -m esft_core.demo.tasks --out data

# Rebuild the demo MoE (tokenizer + pre-training, seeded; CPU).
demo-model: $(STAMP)
	$(BIN)/python -m esft_core.demo.build --out data/demo-moe

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache artifacts
