# vibebox: build, test, lint, bench. `make test` is what CI runs (see .ci/run).

CARGO ?= cargo

.PHONY: build test lint bench

build:
	$(CARGO) build --release

test:
	$(CARGO) test --all-targets

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# Benchmarks come with the VM work (time to a shell prompt, session creation cost,
# `vibebox list` with 10,000 sessions); until then there is nothing to measure.
bench:
	@echo "make bench: no benchmarks yet (they arrive with the VM: see README, Benchmarks)"
