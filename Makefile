# Two commands: `make demo` (set up + run the main job on the embedded default)
#               `make test` (set up with the test extra + run the whole test suite)
PY := .venv/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test setup setup-test bench

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

demo: setup
	$(PY) -m recovery_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: setup-test
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -p no:cacheprovider tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: setup-test
	$(PY) -m bench.recovery_throughput --quick
