# Every target creates .venv itself when it is missing (or when pyproject.toml changed).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
VAE    := $(VENV)/bin/vae
STAMP  := $(VENV)/.installed
RUN    := runs/digits

.PHONY: install test test-fast demo lint clean bench-accuracy bench-speed bench-eval bench-cifar bench-vae bench-reject bench-export bench-concurrency

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# the pure functions and the models' maths only (tests marked slow start processes or train): a quick check
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The main job on the embedded digits set: train, evaluate, sample, classify real PNG files.
demo: $(STAMP)
	$(VAE) train recipes/digits.yaml --name digits --exist-ok
	$(VAE) eval $(RUN)/model.safetensors --iw-samples 1000 --probe-labels 10
	$(VAE) sample $(RUN)/model.safetensors -n 64 -o $(RUN)/sample-grid.png
	$(VAE) sample $(RUN)/model.safetensors -n 36 --class 3 -o $(RUN)/threes.png
	$(VAE) sample $(RUN)/model.safetensors --reconstruct -n 32 -o $(RUN)/reconstructions.png
	$(PY) scripts/export_digits.py $(RUN)/images --count 20 > /dev/null
	$(VAE) sample $(RUN)/model.safetensors --interpolate $(RUN)/images/0/0036.png $(RUN)/images/6/0065.png -o $(RUN)/zero-to-six.png
	$(VAE) classify $(RUN)/model.safetensors $(RUN)/images --top-k 2 --reject
	$(VAE) info $(RUN)/model.safetensors
	@echo "demo outputs are in $(RUN)/ (report.html, model.safetensors, metrics.csv, *.png, images/)"

lint: $(STAMP)
	$(PY) -m ruff check vae_cli tests scripts

clean:
	rm -rf runs .pytest_cache

# Few-label accuracy on full MNIST from ../shared/data/mnist (3 seeds x 100 labels, then all labels).
bench-accuracy: $(STAMP)
	$(PY) scripts/bench_accuracy.py

# Training/classify speed on full MNIST, side by side with pythae 0.1.2 in its own venv (bench-venv).
bench-venv/.installed:
	test -x bench-venv/bin/python || $(PYTHON) -m venv bench-venv
	bench-venv/bin/python -m pip install -q 'torch>=2.4' 'torchvision>=0.19' pythae==0.1.2
	touch $@

bench-speed: $(STAMP) bench-venv/.installed
	$(PY) scripts/bench_speed.py --pythae-python bench-venv/bin/python

# IWAE NLL (K=5000) of recipes/mnist-vae.yaml on binarised MNIST, and classify --reject rates (noise,
# letters, shapes against held-back digits) for the MNIST and digits models.
bench-eval: $(STAMP)
	$(PY) scripts/bench_eval.py

# Colour photos: CIFAR-10 JPEG folders (../shared/data/cifar10) with 4000 labels; test error and time.
bench-cifar: $(STAMP)
	$(PY) scripts/bench_cifar.py

# Generative photos: recipes/cifar10-vae.yaml (hierarchical VAE, 55-minute budget) on the CIFAR-10 JPEG folders;
# test bits/dim (ELBO on all 10,000, IWAE k=100 on 2,000 class-balanced), recon_accuracy, sample_accuracy.
bench-vae: $(STAMP)
	$(PY) scripts/bench_vae.py

# --reject on colour photos: the bench-cifar model against noise, constant, gradient, MNIST, garment,
# flipped/inverted CIFAR and synthetic-scene PNG sets; AUROC per set and score.
bench-reject: $(STAMP)
	$(PY) scripts/bench_reject.py

# The exported ONNX classifier in onnxruntime against `vae classify` on 10,000 MNIST PNGs (needs the
# bench-accuracy model).
bench-export: $(STAMP)
	$(PY) scripts/bench_export.py

# Trainings side by side: one alone, then 2 and 3 at once; images/s each and in total; then classify
# back to back beside one training; then the same pinned to one core (taskset). Other recipes: see
# BENCHMARKS.md (e.g. --recipe recipes/mnist-100-labels.yaml data.root=... train.epochs=3).
bench-concurrency: $(STAMP)
	$(PY) scripts/bench_concurrency.py --out bench-out/concurrency --classify
	$(PY) scripts/bench_concurrency.py --out bench-out/concurrency-1core --taskset 0
