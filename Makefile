# The two set-up commands (see README.md): `make demo` and `make test`.
VENV := .venv
STAMP := $(VENV)/.crb-installed

.PHONY: demo test lint docs

demo: $(STAMP)
	$(VENV)/bin/crb demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
	$(VENV)/bin/ruff check crb tests benchmarks

lint: $(STAMP)
	$(VENV)/bin/ruff check crb tests benchmarks

docs: $(STAMP)
	$(VENV)/bin/python -m crb.recipe.docs

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh
