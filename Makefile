# Set-up and everyday commands. Everything runs inside .venv.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test lint format demo bench bench-quality clean

venv: $(STAMP)

# torch/torchvision first, pinned: a looser spec can pull a multi-GB build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: venv
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

test: venv lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile

demo: venv
	$(BIN)/maskd demo --task segmentation

bench: venv
	$(BIN)/python benchmarks/loss_kernel.py

# The student-quality table: validation sweep, then every row with 3 seeds (hours on 2 cores;
# resumable: a re-run skips finished cells).
bench-quality: venv
	$(BIN)/python benchmarks/quality.py --tune
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/quality.py --task segmentation --tune
	$(BIN)/python benchmarks/quality.py --task segmentation

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
