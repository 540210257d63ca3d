# fedmm: `make run` runs the default federation, `make test` passes the tests.
# Each target creates/updates the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-unit test-integration faults bench bench-gpu dp-sweep defaults-sweep docker-e2e clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision first, pinned to the releases these machines hold on disk (CPU works too)
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m simulations.run $(ARGS)

TEST_WORKERS ?= 2  # pytest-xdist workers: federations' process start-ups overlap (README, Tests)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# Not part of `make test`: the fault scenarios on real federations (tests/faults, marker
# faults_slow; ~30 min on 2 busy cores) after the fuzzing and probes, then their table.
FAULTS_RESULTS ?= runs/faults/results.jsonl
faults: $(STAMP)
	rm -f $(FAULTS_RESULTS)
	FEDMM_FAULTS_RESULTS=$(FAULTS_RESULTS) $(BIN)/python -m pytest -q \
	    -m "faults or faults_slow" tests/faults $(ARGS); status=$$?; \
	    $(BIN)/python -m tests.faults.table $(FAULTS_RESULTS); exit $$status

# Every CPU benchmark (benchmarks/README.md), one table at the end; ARGS="--only bytes" for some.
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

# The default federation on a CUDA GPU (bf16); skips with a message where there is none.
bench-gpu: $(STAMP)
	PYTHON=$(BIN)/python benchmarks/gpu.sh $(ARGS)

# Not part of `make test`: accuracy vs ε for central DP at 1,000 Poisson-sampled sites (q = 0.1)
# and local DP-SGD at the default 10 sites and at 10 sites of 2,000 rows, the DP-aware frozen
# pretrained model; each a table + plot in runs/dp-*/ (README, "Privacy"); ~3 h on 2 CPU cores.
DP_CENTRAL ?= model=lite0_minilm_dp partition=iid partition.num_clients=1000 \
              data.demo_train=20000 data.demo_test=500 data.demo_dir=data/demo-20k \
              strategy.sampling=poisson strategy.fraction_train=0.1 strategy.rounds=20 \
              train.lr=0.01 privacy.clipping_norm=3
DP_LOCAL   ?= model=lite0_minilm_dp train.batch_size=64 train.lr=0.01
DP_LOCAL_2K ?= model=lite0_minilm_dp partition=iid data.demo_train=20000 data.demo_test=500 \
              data.demo_dir=data/demo-20k train.batch_size=128 train.lr=0.01
dp-sweep: $(STAMP)
	$(BIN)/python -m simulations.dp_sweep --dp central --out runs/dp-central -- $(DP_CENTRAL)
	$(BIN)/python -m simulations.dp_sweep --dp local --out runs/dp-local -- $(DP_LOCAL)
	$(BIN)/python -m simulations.dp_sweep --dp local --out runs/dp-local-2k -- $(DP_LOCAL_2K)

# Not part of `make test`: the measured choice of the default local-training recipe, recipes ×
# IID / Dirichlet 0.5 / 0.1 / half the sites image-less / natural sites × seeds, on the default
# model (README, "Defaults that survive heterogeneity"); ~2 h on 2 CPU cores, resumable.
defaults-sweep: $(STAMP)
	$(BIN)/python -m simulations.defaults_sweep --out runs/defaults $(ARGS)

# Not part of `make test`: builds the images (offline, from docker/wheelhouse) and trains a
# federation of containers under a Docker daemon of its own (root; README, "Deploy with Docker").
docker-e2e:
	docker/e2e.sh

clean:
	rm -rf runs data .pytest_cache
