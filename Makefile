PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/mailsvc/v1/*.proto)
PROTOC = $(BIN)/python -m grpc_tools.protoc -I protos \
	--python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) \
	--descriptor_set_out=$(1)/mailsvc.protoset --include_imports $(PROTOS)

.PHONY: venv generate check-generated test lint run bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
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
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check mailsvc tests
	$(BIN)/ruff format --check mailsvc tests
	$(BIN)/mypy

run: $(STAMP)
	$(BIN)/mailsvc serve --dev

clean:
	rm -rf $(VENV) build *.egg-info
