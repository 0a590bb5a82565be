# make demo | make test | make bench | make serve   (each sets up .venv on first use)
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_DATA := build/demo-data
PREFECT_PORT ?= 4200
SERVER_WAIT_S ?= 60
# Debian packages holding the real images of the demo (see ../shared/reference/offline-data.md), and
# Chromium, which the report's browser test opens the page in (headless).
DEBIAN_PACKAGES := dataset-fashion-mnist openclipart-png tuxpaint-stamps-default adwaita-icon-theme chromium
DEBIAN_MARKERS := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz /usr/share/tuxpaint/stamps \
	/usr/share/icons/Adwaita /usr/share/doc/openclipart-png /usr/bin/chromium

.PHONY: demo test bench serve setup system-deps clean official-baseline

setup: $(INSTALLED) system-deps

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[cpu,dev,export]'  # cpu: faiss-cpu; export: the round-trip tests load its files
	touch $@

system-deps:
	@missing=0; for marker in $(DEBIAN_MARKERS); do test -e $$marker || missing=1; done; \
	if [ $$missing = 1 ]; then \
		echo "installing Debian packages: $(DEBIAN_PACKAGES)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES); \
	fi

demo: setup
	$(BIN)/lvd demo-data --out $(DEMO_DATA)
	$(BIN)/lvd run --preset demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# Every benchmark beside its baseline, one table; quick sizes by default (minutes on 2 cores),
# `make bench BENCH_ARGS=--full` for the sizes each benchmark documents (long).
# The official DINOv2 code (PyPI, April 2023) as the train-step baseline: beside lvd, never in its venv
# (--no-deps: its pinned torch must not replace ours).
OFFICIAL_DIR := build/official-dinov2
OFFICIAL_PACKAGES := dinov2==0.0.1.dev2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
	fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 tabulate termcolor portalocker

official-baseline: $(OFFICIAL_DIR)/.installed
$(OFFICIAL_DIR)/.installed: $(INSTALLED)
	$(BIN)/pip install --quiet --no-deps --target $(OFFICIAL_DIR) $(OFFICIAL_PACKAGES)
	touch $@

bench: setup official-baseline
	$(BIN)/lvd demo-data --out $(DEMO_DATA)
	$(BIN)/python -m benchmarks.run_all $(BENCH_ARGS)

# A local Prefect server plus the served deployments; then, in another shell:
#   PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api prefect deployment run curate-and-train/default
serve: setup
	$(BIN)/lvd demo-data --out $(DEMO_DATA)
	export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api PREFECT_SERVER_ANALYTICS_ENABLED=false; \
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) & server=$$!; \
	trap "kill $$server" EXIT; \
	for attempt in $$(seq $(SERVER_WAIT_S)); do curl -sf $$PREFECT_API_URL/health >/dev/null && break; sleep 1; done; \
	curl -sf $$PREFECT_API_URL/health >/dev/null || { echo "no Prefect server answered in $(SERVER_WAIT_S) s" >&2; exit 1; }; \
	$(BIN)/lvd serve --preset demo

clean:
	rm -rf build
