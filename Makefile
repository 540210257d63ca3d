# fedmm: `make run` runs the default federation, `make test` passes the tests.
# Each target creates/updates the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-unit test-integration bench bench-gpu docker-e2e clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision first, pinned to the releases these machines hold on disk (CPU works too)
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m simulations.run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# Every CPU benchmark (benchmarks/README.md), one table at the end; ARGS="--only bytes" for some.
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

# The default federation on a CUDA GPU (bf16); skips with a message where there is none.
bench-gpu: $(STAMP)
	PYTHON=$(BIN)/python benchmarks/gpu.sh $(ARGS)

# Not part of `make test`: builds the images (offline, from docker/wheelhouse) and trains a
# federation of containers under a Docker daemon of its own (root; README, "Deploy with Docker").
docker-e2e:
	docker/e2e.sh

clean:
	rm -rf runs data .pytest_cache
