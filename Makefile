# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean arm-env

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python examples/demo.py

# Debian's ARM cross compilers and qemu-user (installed when missing: needs root) and an aarch64 Python with
# TVM's aarch64 wheels (tvmlayers/emulation.py; built once into the user's cache): the edge tests run on them.
arm-env: $(STAMP)
	$(VENV)/bin/python -m tvmlayers.emulation

test: $(STAMP) arm-env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -n 2 tests

bench: $(STAMP)
	$(VENV)/bin/tvmlayers bench examples/workloads/resnet18.toml --markdown bench.md --plot bench.png

clean:
	rm -rf $(VENV) *.egg-info
