# vibebox: build, test, lint, bench. `make test` is what CI runs (see .ci/run).

CARGO ?= cargo

.PHONY: build test lint bench

build:
	$(CARGO) build --release

test:
	$(CARGO) test --all-targets

# macOS is type-checked from Linux (needs `rustup target add aarch64-apple-darwin`).
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --target aarch64-apple-darwin --all-targets -- -D warnings

# The daily loop against floors measured in the same run (benches/vibebox.rs); the
# VM parts need VIBEBOX_TEST_IMAGES, as the VM tests do.
bench:
	$(CARGO) bench --bench vibebox
