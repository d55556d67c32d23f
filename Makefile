# kdcache: `make train-student` does everything on a fresh machine; `make test` runs the tests.
# Every target reuses what exists: the venv, the dataset, the teacher, the cache (a cache hit computes nothing).

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
KDCACHE     := $(BIN)/kdcache
DATA        ?= data
# The CPU/CUDA wheels pinned here are the ones this project is tested with; pip's own resolver picks the rest.
TORCH_PKGS  ?= torch==2.14.1 torchvision==0.29.1
TEACHER     := $(DATA)/teachers/default.pt
CACHE_FLAGS ?= --data fashion-mnist:train --layer layer3 --layer avgpool
STUDENT_FLAGS ?= --loss kd=1 --epochs 10
FMNIST_DIR  := /usr/share/datasets/fashion-mnist

export KDCACHE_DATA := $(DATA)

.PHONY: install fashion-mnist teacher teacher-cache train-student test results results-views results-codecs bench clean help

help:
	@echo "make train-student   set up everything, cache the default teacher, train and evaluate a student"
	@echo "make teacher-cache   stop after the cache (prints its path)"
	@echo "make teacher         train the default teacher into $(TEACHER)"
	@echo "make test            run the test suite"
	@echo "make results         reproduce the README's results table (long: see README)"
	@echo "make results-views   reproduce the README's augmented-views experiment (long: see README)"
	@echo "make results-codecs  reproduce the README's codec distortion table"
	@echo "make bench           throughput benchmark"
	@echo "make clean           remove the caches and student runs (keeps the venv, data and teacher)"

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PKGS)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

# Debian's dataset-fashion-mnist when we can install it; otherwise the pipeline falls back to torchvision's
# download at run time and, failing that, says how to get the data.
$(DATA)/.fashion-mnist:
	@mkdir -p $(DATA)
	@if [ ! -d $(FMNIST_DIR) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
		|| echo "note: could not install dataset-fashion-mnist; will try torchvision's download"; \
	fi
	@touch $@

fashion-mnist: $(DATA)/.fashion-mnist

$(TEACHER): | $(BIN)/.installed $(DATA)/.fashion-mnist
	$(KDCACHE) teacher --out $(TEACHER)

teacher: $(TEACHER)

teacher-cache: $(TEACHER)
	$(KDCACHE) teacher-cache $(CACHE_FLAGS)

# No pipe into `tail`: a pipe's status is tail's, and a failed teacher-cache must stop here with its own error.
train-student: $(TEACHER)
	@out=$$($(KDCACHE) teacher-cache $(CACHE_FLAGS)) || exit $$?; \
	printf '%s\n' "$$out"; \
	$(KDCACHE) train-student --cache "$$(printf '%s\n' "$$out" | tail -n 1)" $(STUDENT_FLAGS)

test: $(BIN)/.installed $(DATA)/.fashion-mnist
	$(BIN)/python -m pytest -q

results: $(TEACHER)
	$(BIN)/python -m pipeline.results --write-readme

results-views: $(TEACHER)
	$(BIN)/python -m pipeline.results_views --write-readme

results-codecs: $(TEACHER)
	$(BIN)/python -m pipeline.results_codecs --write-readme

bench: $(BIN)/.installed
	$(KDCACHE) bench

clean:
	rm -rf $(DATA)/cache $(DATA)/runs
