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

# The daily loop against floors measured in the same run (benches/vibebox.rs); the
# VM parts need VIBEBOX_TEST_IMAGES, as the VM tests do.
bench:
	$(CARGO) bench --bench vibebox
