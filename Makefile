PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/mailsvc/v1/*.proto)
PROTOC = $(BIN)/python -m grpc_tools.protoc -I protos \
	--python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) \
	--descriptor_set_out=$(1)/mailsvc/v1/mailsvc.protoset --include_imports $(PROTOS)
# buf (proto lint) comes from npm, pinned, installed under .tools/ (git-ignored).
BUF_VERSION := 1.75.0
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
BUF_STAMP := $(TOOLS)/.buf-$(BUF_VERSION)

.PHONY: venv generate check-generated test lint buf run bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $(STAMP)

generate: $(STAMP)
	rm -rf generated/mailsvc && mkdir -p generated/mailsvc/v1
	$(call PROTOC,generated)
	touch generated/mailsvc/v1/__init__.py

check-generated: $(STAMP)
	@tmp=$$(mktemp -d) && mkdir -p $$tmp/mailsvc/v1 && touch $$tmp/mailsvc/v1/__init__.py && \
	$(call PROTOC,$$tmp) && \
	if diff -r -x __pycache__ $$tmp generated >/dev/null; then rm -rf $$tmp; echo "generated/ is up to date"; \
	else diff -r -x __pycache__ $$tmp generated | head -20; rm -rf $$tmp; \
	echo "generated/ is stale: run 'make generate' and commit"; exit 1; fi

test: $(STAMP) check-generated
	$(BIN)/python -m pytest -n 2

buf: $(BUF_STAMP)

$(BUF_STAMP):
	npm install --prefix $(TOOLS) --no-save --no-package-lock --no-audit --no-fund \
		--ignore-scripts @bufbuild/buf@$(BUF_VERSION)
	touch $@

lint: $(STAMP) $(BUF_STAMP)
	$(BIN)/ruff check mailsvc tests bench
	$(BIN)/ruff format --check mailsvc tests bench
	$(BIN)/mypy
	$(BUF) lint

run: $(STAMP)
	$(BIN)/mailsvc serve --dev

# The benchmark (bench/): installs the bench extra once, then runs every scenario (~7 min).
# BENCH_ARGS passes options on, e.g. BENCH_ARGS='--calls 2000 --profile always'.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) build *.egg-info
