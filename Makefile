# The two commands of the README: `make demo` (set up, then `dvc repro` on the demo data) and
# `make test` (set up, then the test suite). Both install what they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEBIAN_PACKAGES := dataset-fashion-mnist
TEST_DEBIAN_PACKAGES := chromium   # the browser tests render the pipeline's pages in it
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
export HF_HUB_OFFLINE := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

IMAGE ?= ghcr.io/mapet-project/mapet:0.1.0

.PHONY: demo test test-image setup debian lock benchmark compare pipeline image clean

demo: setup data/manifest.parquet
	dvc repro
	dvc metrics show

test: setup
	@$(MAKE) -s debian DEBIAN_PACKAGES="$(TEST_DEBIAN_PACKAGES)"
	python -m pytest

# data.dvc pins data/. With a DVC remote configured, pull it; without one (the demo), re-import
# the Fashion-MNIST demo data, which comes out byte-identical to the pinned version.
data/manifest.parquet: | setup
	@if [ -n "$$(dvc remote list)" ]; then dvc pull data.dvc; else \
	  mapet data import && dvc commit -f -q data.dvc && \
	  { git diff --quiet data.dvc || { echo "error: the imported demo data differs from the version pinned by data.dvc" >&2; exit 1; }; }; fi

setup: debian $(INSTALLED) .dvc/plots.html

# `dvc plots show`'s page template (.dvc/config: plots.html_template) with the Vega versions DVC
# loads from a CDN inlined, so that the page renders offline; npm fetches them, checking their hashes.
VEGA := vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
.dvc/plots.html: tools/plots_template.py Makefile        # Makefile: VEGA's versions
	@rm -rf build/vega && mkdir -p build/vega
	cd build/vega && npm pack --silent $(VEGA) >/dev/null
	$(PYTHON) tools/plots_template.py $@ $(foreach package,$(VEGA),build/vega/$(subst @,-,$(package)).tgz)

debian:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	command -v kubectl >/dev/null || missing="$$missing kubernetes-client"; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $$missing; fi

$(INSTALLED): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -r requirements.lock
	$(BIN)/pip install --no-deps -e .
	touch $@

# Re-resolve requirements.in into requirements.lock (needs the network).
lock:
	rm -rf $(VENV).lock && $(PYTHON) -m venv $(VENV).lock
	$(VENV).lock/bin/pip install -q -r requirements.in
	{ head -1 requirements.lock; $(VENV).lock/bin/pip freeze --all --exclude pip; } > requirements.lock.new && mv requirements.lock.new requirements.lock
	rm -rf $(VENV).lock

benchmark: setup
	python benchmarks/pretrain_step.py

# The fair comparison: mapet, plm, mim and scratch x 5 seeds, each a DVC experiment, at the budget of
# params.yaml; tables in reports/compare/. Needs the data in DVC's cache (after `make demo`).
compare: setup data/manifest.parquet
	python benchmarks/compare.py

# The Kubeflow pipeline compiled against $(IMAGE); commit pipelines/mapet_pipeline.yaml.
pipeline: setup
	MAPET_IMAGE=$(IMAGE) python -m pipelines.cli compile

# The project image: starts (or installs) a Docker engine, makes a Debian base when none is given
# and no registry answers, serves the lock's wheels to the build, builds, prints time and size.
#   make image IMAGE=registry/mapet:tag [BASE=python:3.11-slim-bookworm] && docker push registry/mapet:tag
#   PIP_SOURCE=index CA_BUNDLE=/path/ca.pem make image     # the build's pip reaches the index itself
image:
	bash components/image.sh build $(IMAGE) $(BASE)

# The container tests (tests/test_containers.py) against that image; stops the engine if `image` started it.
test-image: setup image
	@status=0; python -m pytest -m container tests/test_containers.py || status=$$?; \
	bash components/image.sh stop-engine; exit $$status

clean:
	rm -rf $(VENV)
