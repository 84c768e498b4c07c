# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NUM_GPUS ?= 2
DATA ?= data/shakespeare
RUN ?= runs/demo
DEMO_STEPS ?= 600

.PHONY: install demo test test-gpu-stack lint finetune-demo bench clean

# CPU machines take torch 2.13.0, the CPU build; an unpinned `torch` would pull a CUDA build of several GB.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/gpt1 prepare --out $(DATA) --vocab-size 8192
	rm -rf $(RUN)
	$(BIN)/deepspeed --num_gpus $(NUM_GPUS) --module gpt1.train --deepspeed_config ds_configs/zero0_autocast_bf16.json \
		--data $(DATA) --model gpt1-tiny --out $(RUN) --max-steps $(DEMO_STEPS) --warmup-steps 50 --lr 1e-3 \
		--eval-interval 100 --log-interval 20 --save-interval 300
	$(BIN)/python -m gpt1.cli metrics $(RUN)
	$(BIN)/gpt1 generate --run $(RUN) --prompt "ROMEO." --max-new-tokens 120 --temperature 0.8 --top-k 40

FT_RUN ?= runs/finetune-demo
finetune-demo: install
	test -f $(RUN)/model.pt || { echo "error: $(RUN)/model.pt not found; run 'make demo' first" >&2; exit 2; }
	$(BIN)/python -m gpt1.corpus_task --data $(DATA) --out $(DATA)/acceptability
	$(BIN)/deepspeed --num_gpus $(NUM_GPUS) --module gpt1.finetune --deepspeed_config ds_configs/zero0_autocast_bf16.json \
		--init $(RUN) --task cola --data-dir $(DATA)/acceptability --out $(FT_RUN) --lr 1e-3

# Two workers, one test file each at a time (pytest-xdist): the suite is mostly single-threaded Python (Triton's
# interpreter, DeepSpeed launches), so a 2-core machine runs it in about half the time.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The suite under the versions of the GPU machines that measure this project (torch 2.11, triton 3.6), on a CPU, so
# that an API those versions lack shows here and not in a GPU run. torch 2.11 from PyPI is a CUDA build
# (about 5 GB installed with its CUDA libraries) that runs on a CPU; numpy < 2.4 as the suite last ran there in full
# (kernels._common lets triton 3.6's interpreter run under numpy 2.4 too); deepspeed as the GPU machines' wheel.
GPU_STACK := .venv-gpu-stack
$(GPU_STACK)/.installed: setup.py
	$(PYTHON) -m venv $(GPU_STACK)
	$(GPU_STACK)/bin/pip install -q --upgrade pip
	$(GPU_STACK)/bin/pip install -q torch==2.11.0 triton==3.6.0 "numpy<2.4" deepspeed==0.19.8
	$(GPU_STACK)/bin/pip install -q -e ".[dev]"
	touch $@

test-gpu-stack: $(GPU_STACK)/.installed
	$(GPU_STACK)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

lint: install
	$(BIN)/ruff check gpt1 kernels bench tests

clean:
	rm -rf $(VENV) $(GPU_STACK) *.egg-info
