# Two commands on a fresh clone, needing only python3 (3.10+): `make demo` and `make test`.
# Both create .venv once and reuse it until pyproject.toml changes. CuPy installs and
# imports without a GPU; the cuda13/cuda12 extra brings NVRTC and the CUDA headers, which
# the compile check needs, and nothing else of the toolkit (150 MB instead of 1.7 GB).
# Pick the CUDA major version of CuPy with `make test CUDA=cuda12` (default cuda13).
PYTHON ?= python3
CUDA ?= cuda13
VENV := .venv
PY := $(VENV)/bin/python
# One stamp per CUDA choice: switching CUDA=... reinstalls, a plain rerun does not.
STAMP := $(VENV)/.installed-$(CUDA)
OTHER_CUPY := $(filter-out cupy-$(CUDA)x,cupy-cuda12x cupy-cuda13x)

ifeq ($(filter $(CUDA),cuda12 cuda13),)
$(error CUDA must be cuda12 or cuda13, got '$(CUDA)')
endif

.PHONY: demo test $(VENV)

demo: $(VENV)
	$(PY) -m cuflash.demo

test: $(VENV)
	$(PY) -m pytest -q
	$(PY) -m cuflash.compile_check

$(VENV): $(STAMP)

# Editable installs of a pyproject-only package need pip >= 21.3; a new venv may bundle
# an older one.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# cupy-cuda12x and cupy-cuda13x both provide the module `cupy`: drop the one not chosen.
# The jax extra (CPU JAX, ~500 MB with its scipy) runs tests/test_jax.py.
$(STAMP): pyproject.toml | $(PY)
	if $(PY) -m pip show --quiet $(OTHER_CUPY) 2>/dev/null; then \
		$(PY) -m pip uninstall --quiet --yes $(OTHER_CUPY); fi
	$(PY) -m pip install --quiet -e '.[test,$(CUDA),jax]'
	rm -f $(VENV)/.installed-*
	touch $@
