# LiveStage: one entry point for setup, running, testing and benchmarking.
SHELL := /bin/bash
VENV := .work/venv
PY := $(VENV)/bin/python
PRESET ?= demo

.PHONY: setup demo images test test-fast render train evaluate up bench bench-model bench-pipeline bench-triton bench-speech bench-conversation verify-parity protos chart-check compose-check clean

setup: ## create .work/venv with every dependency (idempotent)
	@bash scripts/setup_env.sh

test: setup ## the whole test suite (what CI runs)
	@$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: setup ## model tests only
	@$(PY) -m pytest -q -p no:cacheprovider tests/models $(PYTEST_ARGS)

demo: setup ## the main job: the whole stack, the sample character asked the sample question -> out/demo.mp4
	@$(PY) -m livestage.cli demo --preset $(PRESET) --out out/demo.mp4

render: setup ## in-process on the embedded default: a sample character answering a sample voice
	@$(PY) -m livestage.cli render --preset $(PRESET) --sample --out out/render.mp4

train: setup ## the demo model's training recipe (resumable, about 2 h on 2 CPU cores) -> livestage/models/trained/demo
	@$(PY) -m livestage.cli train --preset $(PRESET)

evaluate: setup ## quality report of the trained model (lip sync, listening, identity drift, artefacts, cost) -> docs/evaluation
	@$(PY) -m livestage.cli evaluate --preset $(PRESET) --out docs/evaluation

verify-parity: setup ## check our DiT and VAE against the shared Wan2.1 reference cases
	@for f in ../shared/parity/*.safetensors; do $(PY) -m livestage.cli checkpoint verify $$f || exit 1; done

up: setup ## the whole stack on loopback (nats, redis, every service) until Ctrl-C
	@$(PY) -m livestage.devstack --preset $(PRESET)

protos: setup ## regenerate the gRPC/protobuf code from protos/
	@$(PY) -m livestage.protos

bench: bench-model bench-pipeline bench-triton bench-speech bench-conversation ## every benchmark, numbers from one run each

bench-model: setup ## in-process: per-chunk latency per stage (median, p95) and real-time factor
	@$(PY) loadtests/bench_model.py --presets tiny demo

bench-pipeline: setup ## distributed vs in-process: stage/e2e latency, first chunk, throughput
	@$(PY) loadtests/bench_pipeline.py --presets tiny demo

bench-triton: setup ## the same stage engines in-process vs inside a Triton server (CPU)
	@$(PY) loadtests/bench_triton.py --presets tiny demo

bench-speech: setup ## ASR word error rate and RTF, TTS RTF, LLM first token and tokens/s, VAD RTF
	@$(PY) loadtests/bench_speech.py

bench-conversation: setup ## whole stack: end of user speech -> first answer frame, barge-in latency
	@$(PY) loadtests/bench_conversation.py --preset tiny --runs 3

chart-check: setup ## render the Helm chart with every values file and validate it strictly
	@$(PY) -m pytest -q -p no:cacheprovider tests/deploy -k "chart or values or pods or images or broken"

compose-check: setup ## validate docker-compose.yml with the Compose v2 binary (with throwaway credentials)
	@tmp=$$(mktemp -d) && ENV_FILE=$$tmp/.env STATE_DIR=$$tmp/state bash deploy/compose-env.sh && \
	  $$($(PY) -c 'import compose,os;print(os.path.join(os.path.dirname(compose.__file__),"docker-compose"))') \
	  --env-file $$tmp/.env -f docker-compose.yml config -q && echo "docker-compose.yml: valid"; rc=$$?; rm -rf $$tmp; exit $$rc

images: ## build the service images (needs a Docker engine): CPU, CUDA, Triton
	docker build -t livestage:cpu .
	docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t livestage:cuda .
	docker build --target triton -t livestage:triton .

clean:
	rm -rf .work out
