# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= $(abspath ../shared)
export VAE_WEIGHTS_DIR ?= $(SHARED)/weights
# pip resolves torch to the local CPU wheel only when pinned; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: venv demo test test-cuda lint bench clean

$(BIN)/vae: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,ray]"
	touch $@

venv: $(BIN)/vae

demo: venv
	@mkdir -p out
	$(BIN)/vae roundtrip $(SHARED)/images/astronaut.png -o out/astronaut.recon.png
	$(BIN)/vae encode $(SHARED)/images/astronaut.png -o out/astronaut.latent
	$(BIN)/vae decode out/astronaut.latent -o out/astronaut.decoded.png
	@echo "outputs: $$(ls out/astronaut.* | tr '\n' ' ')"

lint: venv
	$(BIN)/ruff check vaecli tests bench

test: venv lint
	$(BIN)/python -m pytest -q -m "not cuda"

# On a CUDA machine: the GPU checks (fp32 parity with TF32 off, fp16/bf16 quality cost, SVD, tiling budget).
test-cuda: venv
	$(BIN)/python -m pytest -q -m cuda

clean:
	rm -rf $(VENV) out .pytest_cache

bench: venv
	$(BIN)/python bench/speed.py --full
	$(BIN)/python bench/pixel_time.py
	$(BIN)/python bench/whole_or_rows.py
	$(BIN)/python bench/tiling_memory.py
	$(BIN)/python bench/batch_throughput.py
	$(BIN)/python bench/ray_throughput.py
	$(BIN)/python bench/video_memory.py --scale 256:160
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/roundtrip_speed.py
	$(BIN)/python bench/kl_attention.py --sizes 2048
