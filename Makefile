# Two commands do all the set-up on a fresh machine:
#   make run    train + build the default models the store lacks, then serve the API
#   make test   the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV := .venv
SAM_VENV := .venv-sam
CHECKOV_VENV := .venv-checkov
BIN := $(VENV)/bin
SAM_CLI_VERSION := 1.170.0
CHECKOV_VERSION := 3.3.30
export HF_HUB_OFFLINE := 1
export SAM_CLI_TELEMETRY := 0

.PHONY: run test setup lint sam-build deploy package-check bench mutate clean

# the project's environment (torch==2.13.0 is pinned: the CPU wheel on local disk)
$(VENV)/.installed: pyproject.toml
	@echo "make: installing modelfn and its dev extras into $(VENV) (torch 2.13.0 CPU, onnx, moto, ...): about a minute the first time"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# the SAM CLI pins older boto3/click/pydantic: it lives in its own environment
$(SAM_VENV)/.installed:
	@echo "make: installing the SAM CLI $(SAM_CLI_VERSION) into $(SAM_VENV) (kept apart: it pins older boto3/click/pydantic)"
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install --quiet --disable-pip-version-check 'aws-sam-cli==$(SAM_CLI_VERSION)'
	touch $@

# the IaC scanner (the template's findings are fixed, or skipped in the resource's
# Metadata with the reason): it pins older boto3 and packaging, so it lives apart too
$(CHECKOV_VENV)/.installed:
	@echo "make: installing checkov $(CHECKOV_VERSION) into $(CHECKOV_VENV) (kept apart: it pins older boto3/packaging)"
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --disable-pip-version-check 'checkov==$(CHECKOV_VERSION)'
	touch $@

setup: $(VENV)/.installed $(SAM_VENV)/.installed $(CHECKOV_VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/modelfn up

test: setup
	$(BIN)/ruff check src functions tests bench
	$(BIN)/mypy src
	PATH="$(CURDIR)/$(SAM_VENV)/bin:$$PATH" $(BIN)/pytest

lint: $(VENV)/.installed $(CHECKOV_VENV)/.installed
	$(BIN)/ruff check src functions tests bench
	$(BIN)/mypy src
	$(BIN)/cfn-lint template.yaml
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --framework cloudformation -f template.yaml

# Lambda artefacts without Docker: wheels for manylinux/python3.12 (see layers/runtime/Makefile)
# for the architecture the stack deploys: make sam-build ARCH=arm64
ARCH ?= x86_64
sam-build: setup
	LAMBDA_ARCH=$(ARCH) $(SAM_VENV)/bin/sam build --parameter-overrides Architecture=$(ARCH)
	$(BIN)/modelfn package-check --arch $(ARCH)

# deploy a samconfig profile, with overrides: make deploy ENV=prod OVERRIDES="PreloadModels=minilm"
# The parameters are written into the functions' code too (functions/*/Makefile): a deploy
# that changes only parameters still publishes new versions, and CodeDeploy shifts to them.
ENV ?= dev
OVERRIDES ?=
deploy: setup
	@params="$$($(BIN)/modelfn deploy-parameters --config-env $(ENV) $(OVERRIDES))" && \
	arch="$$($(BIN)/modelfn deploy-parameters --config-env $(ENV) --architecture $(OVERRIDES))" && \
	echo "deploying $(ENV): $$params" && \
	MODELFN_DEPLOY_PARAMETERS="$$params" LAMBDA_ARCH=$$arch $(SAM_VENV)/bin/sam build \
		--config-env $(ENV) --parameter-overrides $$params && \
	$(BIN)/modelfn package-check --arch $$arch && \
	$(SAM_VENV)/bin/sam deploy --config-env $(ENV) --parameter-overrides $$params

# the serving benchmarks (cold start, warm latency and cost, BentoML peer, sizes): about
# 10 minutes; results and charts in bench/results/, summary in bench/results/serving.md;
# then the build's optimization report (every candidate of every example, session
# creation and cold start before / after): about 8 minutes, bench/results/optimization.md;
# then asynchronous inference in serve --with-s3: about 3 minutes, bench/results/async-jobs.md
bench: $(VENV)/.installed
	$(BIN)/python -m bench.serving
	$(BIN)/python -m bench.optimization
	$(BIN)/python -m bench.async_jobs

# how strong the tests are, as a number: mutmut over the runtime, the store and registry
# and the export gates ([tool.mutmut] in pyproject.toml), with the fast tests; the examples'
# store is built once into .mutate/store (about 4 minutes; `rm -rf .mutate` rebuilds it);
# a fresh run each time (8,016 mutants, mypy first, each mutant's module and package tests
# and 0.5 s of the others: 50.5 minutes on 2 cores, measured alone on 2026-12-03); score
# and every surviving mutant in bench/results/mutation.md. Not part of `make test`.
mutate: setup
	$(BIN)/python -m tests.prebuild .mutate/store
	rm -rf mutants
	@start=$$(date +%s); \
	PATH="$(CURDIR)/$(SAM_VENV)/bin:$(CURDIR)/$(VENV)/bin:$$PATH" MODELFN_TEST_STORE="$(CURDIR)/.mutate/store" \
		$(BIN)/mutmut run --max-children 2; \
	test -f mutants/mutmut-stats.json && \
	$(BIN)/python -m bench.mutation --before bench/results/mutation-before.json --seconds $$(( $$(date +%s) - start ))

clean:
	rm -rf .aws-sam .pytest_cache .ruff_cache mutants
