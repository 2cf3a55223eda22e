# Open-AutoGLM: `make serve` starts the server on the demo model, `make test` runs the whole suite.
# Both create .venv themselves and install the pinned versions from constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: install serve test test-fast lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -c constraints.txt torch==2.13.0
	$(PIP) -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/autoglm serve --no-auth

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: $(STAMP)
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

# The whole suite, slow end-to-end tests included (what CI runs).
test: lint
	$(VENV)/bin/pytest -q -ra

# Everything but the slow end-to-end tests, for quick local iterations.
test-fast: lint
	$(VENV)/bin/pytest -q -ra -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
