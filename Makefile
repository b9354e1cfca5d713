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
# llama.cpp's multimodal library is left out of the build (about a sixth of its compile time).
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

# The test suite (builds its own engine copies in temporary folders).
test: venv $(VENV)/.installed-test
	$(PY) -m pytest tests -q

# Engine benchmarks; writes BENCHMARKS.md.
bench: venv
	$(PY) bench.py

# Remove everything this Makefile builds (not data/ or out/).
clean:
	rm -f run runfast runomp rundebug runsan tests/engine_logits tests/engine_kernels
