# make demo: venv + install + train the default model on the embedded digits, figures, test NLL
# make test: the test suite (same venv)
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_RUN ?= runs/demo

.PHONY: install demo test lint clean

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,defend,compress]"
	touch $@

install: $(BIN)/.installed

demo: install
	rm -rf $(DEMO_RUN)
	$(BIN)/pixelchain train gated_pixelcnn --dataset digits --run-dir $(DEMO_RUN) --epochs 30 \
		--set channels=32 --set num_layers=4 --set head_channels=64 --batch-size 32
	@echo "figures: $(DEMO_RUN)/samples.png $(DEMO_RUN)/completions.png"

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
