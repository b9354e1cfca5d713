# tinystories-zh: build the C engine, set up Python, run the demo, the tests and the benchmarks.
# Every engine target writes ./run, as llama2.c users expect (`make runomp && ./run model.bin`);
# tests build their own copies elsewhere with `make run BIN=path`.

CC ?= cc
CFLAGS ?= -O3 -Wall -Wextra -std=c99
LDLIBS = -lm
BIN ?= run
# What to compile: run.c, or a test harness that #includes it (tests build tests/engine_*.c with
# the same flags through `make runsan BIN=... SRC=tests/engine_logits.c`).
SRC ?= run.c
PYTHON ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python

# OpenMP if the compiler has it; otherwise the same file builds single-threaded.
OMPFLAG := $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo -fopenmp)
# -march=native where the compiler understands it (not every compiler/target does).
NATIVE := $(shell echo 'int main(void){return 0;}' | $(CC) -march=native -x c - -o /dev/null 2>/dev/null && echo -march=native)
SANFLAGS = -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined

# The engine targets always rebuild (a second or two), so switching between variants that all
# write $(BIN) never leaves a stale binary behind.
.PHONY: all run runfast runomp rundebug runsan venv demo test bench clean

# Default: the portable optimized engine.
all: run

# Plain -O3 build: IEEE semantics, portable plain loops, one thread (no -ffast-math anywhere:
# the parity tolerances assume IEEE arithmetic).
run:
	$(CC) $(CFLAGS) -o $(BIN) $(SRC) $(LDLIBS)

# -O3 with this CPU's instructions (AVX2/AVX-512, int8 VNNI where present), one thread.
runfast:
	$(CC) $(CFLAGS) $(NATIVE) -o $(BIN) $(SRC) $(LDLIBS)

# Native instructions plus OpenMP threads (the fast build users run; OMP_NUM_THREADS picks threads).
runomp:
	$(CC) $(CFLAGS) $(NATIVE) $(OMPFLAG) -o $(BIN) $(SRC) $(LDLIBS)

# Debug build for gdb: no optimization, full symbols.
rundebug:
	$(CC) -g -O0 -Wall -Wextra -std=c99 -o $(BIN) $(SRC) $(LDLIBS)

# AddressSanitizer (leaks included) + UndefinedBehaviorSanitizer; any report aborts the run.
runsan:
	$(CC) $(SANFLAGS) -Wall -Wextra -std=c99 -o $(BIN) $(SRC) $(LDLIBS)

# Python environment inside the checkout; re-made only when requirements.txt changes.
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

# The whole pipeline on the built-in corpus, ending with stories from the C engine.
demo: venv
	$(PY) demo.py

# Test-only packages (requirements-test.txt: llama.cpp through llama-cpp-python, built from source
# the first time, then from pip's wheel cache); re-installed only when that file changes.
# llama.cpp's multimodal library is left out of the build (a quarter of its compile time).
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

# The test suite (builds its own engine copies in temporary folders).
test: venv $(VENV)/.installed-test
	$(PY) -m pytest tests -q

# Engine benchmarks beside llama.cpp's llama-bench; writes BENCHMARKS.md. The first run builds
# llama-bench into ~/.cache/tinystories-zh/ (about 5 minutes); LLAMA_CPP=off skips it, and
# LLAMA_CPP=PATH times another llama-bench.
bench: venv
	$(PY) bench.py $(if $(LLAMA_CPP),--llama_cpp=$(LLAMA_CPP))

# Coverage-guided fuzzing (docs/fuzzing.md): libFuzzer harnesses in tests/fuzz/ built with clang
# and the address + UB sanitizers, each run for FUZZ_SECONDS from seeds that the project's own
# exporters write; harnesses, seeds, corpora and crash inputs all go under FUZZ_DIR (in out/).
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 60
FUZZ_DIR ?= out/fuzz
FUZZ_CFLAGS = -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
	-fno-sanitize-recover=undefined -Wall -Wextra -std=c99
# extra libFuzzer flags, e.g. FUZZ_ARGS=-jobs=2 or -seed=1
FUZZ_ARGS ?=
FUZZ_RUN = -max_total_time=$(FUZZ_SECONDS) -timeout=10 -close_fd_mask=2 -print_final_stats=1
FUZZ_MAX_LEN_model = 65536
FUZZ_MAX_LEN_tokenizer = 65536
FUZZ_MAX_LEN_encode = 4096
.PHONY: fuzz fuzz-model fuzz-tokenizer fuzz-encode fuzz-shard

# All four harnesses, one after another (make -j4 fuzz runs them side by side).
fuzz: fuzz-model fuzz-tokenizer fuzz-encode fuzz-shard

$(FUZZ_DIR)/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_hooks.c run.c run_kernels.h run_f16.h run_threads.h run_tok.c
	@mkdir -p $(FUZZ_DIR)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ $< -lm

$(FUZZ_DIR)/seeds/.done: tests/test_fuzz.py export.py tokenizer.py tinystories.py model.py $(VENV)/.installed
	rm -rf $(FUZZ_DIR)/seeds
	$(PY) tests/test_fuzz.py seeds $(FUZZ_DIR)/seeds
	touch $@

# One C harness for FUZZ_SECONDS: the log goes to FUZZ_DIR/NAME.log, crash inputs to FUZZ_DIR/crashes/.
fuzz-model fuzz-tokenizer fuzz-encode: fuzz-%: $(FUZZ_DIR)/fuzz_% $(FUZZ_DIR)/seeds/.done
	@mkdir -p $(FUZZ_DIR)/corpus/$* $(FUZZ_DIR)/crashes
	FUZZ_TOKENIZER=$(FUZZ_DIR)/seeds/encode_tokenizer.bin $(FUZZ_DIR)/fuzz_$* $(FUZZ_RUN) \
		-max_len=$(FUZZ_MAX_LEN_$*) -artifact_prefix=$(FUZZ_DIR)/crashes/$*- $(FUZZ_ARGS) \
		$(FUZZ_DIR)/corpus/$* $(FUZZ_DIR)/seeds/$* > $(FUZZ_DIR)/$*.log 2>&1 \
		|| { tail -n 40 $(FUZZ_DIR)/$*.log; exit 1; }
	@grep -E '^(Done|stat::number_of_executed_units)' $(FUZZ_DIR)/$*.log | sed 's/^/fuzz-$*: /'

# The shard reader is Python only (tinystories.py): fuzzed with atheris, installed on first use.
$(VENV)/.installed-atheris: $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check atheris
	touch $@

fuzz-shard: $(VENV)/.installed-atheris $(FUZZ_DIR)/seeds/.done
	@mkdir -p $(FUZZ_DIR)/corpus/shard $(FUZZ_DIR)/crashes
	$(PY) tests/fuzz/fuzz_shard.py $(FUZZ_RUN) -max_len=4096 -artifact_prefix=$(FUZZ_DIR)/crashes/shard- \
		$(FUZZ_ARGS) $(FUZZ_DIR)/corpus/shard $(FUZZ_DIR)/seeds/shard > $(FUZZ_DIR)/shard.log 2>&1 \
		|| { tail -n 40 $(FUZZ_DIR)/shard.log; exit 1; }
	@grep -E '^(Done|stat::number_of_executed_units)' $(FUZZ_DIR)/shard.log | sed 's/^/fuzz-shard: /'

# Remove everything this Makefile builds (not data/ or out/).
clean:
	rm -f run runfast runomp rundebug runsan tests/engine_logits tests/engine_kernels
