# Two commands from nothing: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# CI (and anyone who sets QUANTATLAS_CPU_TORCH=1) takes the small CPU build of torch first;
	# users otherwise get whatever `torch>=2.4` resolves to (a CUDA build on Linux).
	if [ "$${CI:-}" = "true" ] || [ "$${QUANTATLAS_CPU_TORCH:-}" = "1" ]; then \
		$(PY) -m pip install --quiet "torch==2.13.0"; fi
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/quantatlas run experiments/baselines.yaml --json runs/baselines.json

test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) runs .cache
