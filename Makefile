# kogpt developer entry points. `make run` and `make test` are all a user needs.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kogpt-installed

.PHONY: setup run test bench docs docs-serve clean

setup: $(STAMP)

# torch first, pinned: the CPU wheel on disk. An unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(PY) -m kogpt $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/decode.py --json bench-decode.json
	$(PY) benchmarks/train_speed.py

# the docs site (mkdocs.yml, docs/): --strict fails on any warning, a broken link or anchor included
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache site
