# Two entry points do all the set-up on a fresh machine: `make run` and `make test`.
# Both are idempotent: the venv, the Kafka jars and the compiled llama-cpp-python wheel
# (the wheelhouse below) are reused on the next run.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA_PORT ?= 9092
PYTEST_ARGS ?=
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

.PHONY: install run test lint bench broker-start broker-stop broker-status clean

# llama-cpp-python compiles llama.cpp from source (3-15 minutes on 2 cores). pip's own build
# uses -march=native, and that build crashed here (segfault in llama_decode on a CPU with
# AVX-512 and AMX): build it portable instead, as docker/Dockerfile does, once per machine, into
# a wheelhouse outside the checkout that later installs and clean checkouts reuse.
LLAMA_CPP_PYTHON_VERSION := 0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
WHEELHOUSE ?= $(HOME)/.cache/marvin-faust/wheels/native-off

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)-*.whl >/dev/null 2>&1 \
		|| CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --no-deps --no-cache-dir \
			--wheel-dir $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	$(BIN)/pip install --force-reinstall --no-deps \
		$(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)-*.whl
	$(BIN)/pip install --progress-bar off -e '.[offline,test]'
	touch $(STAMP)

install: $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --progress-bar off -e '.[offline,test,bench]'
	touch $(BENCH_STAMP)

# Idempotent: a broker already running in .kafka is reused.
broker-start: install
	$(BIN)/marvin-faust broker status | grep -q '^running' \
		|| $(BIN)/marvin-faust broker start --port $(KAFKA_PORT)

broker-stop:
	$(BIN)/marvin-faust broker stop

broker-status:
	$(BIN)/marvin-faust broker status

# The main job: a local Kafka broker and the worker on the offline default model.
run: broker-start
	MARVIN_BROKER=kafka://127.0.0.1:$(KAFKA_PORT) $(BIN)/faust -A marvin_faust worker -l info

# Debian's headless Chromium for the web chat's browser test (Playwright drives it and never
# downloads a browser of its own); installed only when missing, with sudo unless root.
.PHONY: browser
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get update && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	fi

# The whole suite, including the tests against a real broker (started by the tests themselves).
test: install browser
	$(BIN)/ruff check marvin_faust tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check marvin_faust tests bench
	$(BIN)/ruff format --check marvin_faust tests bench

# Benchmarks on a broker and workers of their own (bench/README.md); BENCH_ARGS=--quick for a
# short run. Writes bench/results/ and prints the table.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean: broker-stop
	rm -rf .state .kafka/data .kafka/logs
