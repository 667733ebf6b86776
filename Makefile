# One command for the tests (`make test`) and one for the main job on a built-in example (`make demo`).
# Both create .venv on first use: torch (CPU build) + this package with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: test demo bench-quick clean

$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest

demo: $(VENV)/.installed
	$(VENV)/bin/rankwise demo

bench-quick: $(VENV)/.installed
	$(PY) bench/bench_svd.py --quick
	$(PY) bench/bench_resize_merge.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
