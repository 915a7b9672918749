# Quick start:  make demo   (set up .venv, run the whole pipeline on the bundled demo cohort)
#               make test   (set up .venv, run the test suite)
.PHONY: setup demo test test-all lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/esma demo --out reports/demo

test: setup
	.venv/bin/ruff check helpers tests benchmarks scripts
	.venv/bin/nbstripout --verify notebooks/*.ipynb
	.venv/bin/python -m pytest

test-all: setup
	.venv/bin/python -m pytest -m "slow or not slow"

bench: setup
	.venv/bin/python benchmarks/bench_metrics.py
	.venv/bin/python benchmarks/bench_fat_methods.py
	.venv/bin/python benchmarks/bench_segment.py
	.venv/bin/python benchmarks/bench_scale.py
