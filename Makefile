# tinystories-zh: build the C engine, set up Python, run the demo, the tests and the benchmarks.
# Every engine target writes ./run, as llama2.c users expect (`make runomp && ./run model.bin`);
# tests build their own copies elsewhere with `make run BIN=path`.

CC ?= cc
CFLAGS ?= -O3 -Wall -Wextra
LDLIBS = -lm
BIN ?= run
PYTHON ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python

# OpenMP if the compiler has it; otherwise the same file builds single-threaded.
OMPFLAG := $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo -fopenmp)

.PHONY: all runfast runomp rundebug runsan venv demo test bench clean

# Default: the portable optimized engine.
all: $(BIN)

# Plain -O3 build (IEEE semantics, what the parity tests assume).
$(BIN): run.c $(wildcard run_tok.c)
	$(CC) $(CFLAGS) -o $(BIN) run.c $(LDLIBS)

# -O3 with native instructions, no OpenMP.
runfast: run.c
	$(CC) $(CFLAGS) -march=native -o $(BIN) run.c $(LDLIBS)

# Native instructions plus OpenMP threads (the fast build users run).
runomp: run.c
	$(CC) $(CFLAGS) -march=native $(OMPFLAG) -o $(BIN) run.c $(LDLIBS)

# Debug build for gdb.
rundebug: run.c
	$(CC) -g -O0 -Wall -Wextra -o $(BIN) run.c $(LDLIBS)

# AddressSanitizer + UndefinedBehaviorSanitizer build.
runsan: run.c
	$(CC) -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined -Wall -Wextra -o $(BIN) run.c $(LDLIBS)

# Python environment inside the checkout; re-made only when requirements.txt changes.
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

# The whole pipeline on the built-in corpus, ending with stories from the C engine.
demo: venv
	$(PY) demo.py

# The test suite (builds its own engine copies in temporary folders).
test: venv
	$(PY) -m pytest tests -q

# Engine benchmarks; writes BENCHMARKS.md.
bench: venv runomp
	$(PY) bench.py

# Remove everything this Makefile builds (not data/ or out/).
clean:
	rm -f run runfast runomp rundebug runsan
