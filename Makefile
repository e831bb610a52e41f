# Daisy's tasks. Recipes stay one-liners; behaviour lives in Rust or scripts/.
.DEFAULT_GOAL := help
SHELL := /bin/bash

CARGO ?= cargo
# Plugin crates installed into plugins/ by `make plugins` (test fixtures excluded).
PLUGINS := $(filter-out testkit%,$(notdir $(patsubst %/Cargo.toml,%,$(wildcard plugins/*/Cargo.toml))))
DLL := $(if $(filter Darwin,$(shell uname -s)),dylib,so)

.PHONY: help build plugins fixtures migrate serve demo test fuzz soak lint check-ops deny audit check-schema bench bench-quick bench-ab ci

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

build: ## build every crate of the workspace (debug)
	$(CARGO) build --workspace

plugins: ## build the plugins and install their libraries into plugins/ (atomically: beside, then mv)
	$(CARGO) build $(addprefix -p ,$(PLUGINS))
	@for p in $(subst -,_,$(PLUGINS)); do install -m 0644 target/debug/lib$$p.$(DLL) plugins/.lib$$p.$(DLL).tmp && mv -f plugins/.lib$$p.$(DLL).tmp plugins/lib$$p.$(DLL) && echo "installed plugins/lib$$p.$(DLL)"; done

migrate: ## create or update the schema of DATABASE_URL
	$(CARGO) run -q -p proxy -- migrate

serve: plugins ## run daisy serve on DAISY_ADDR (default 127.0.0.1:50051)
	$(CARGO) run -q -p proxy -- serve

demo: ## the whole system: Daisy, a worker and the Collect backend, in a guided tour
	scripts/demo.sh

fixtures: ## build the test fixtures that live outside the workspace (panic=abort, plugin-api 1.0)
	$(CARGO) build --locked --manifest-path plugins/testkit-panic-abort/Cargo.toml --target-dir target/fixtures
	$(CARGO) build --locked --manifest-path plugins/testkit-old-minor/Cargo.toml --target-dir target/fixtures

test: ## run the whole test suite against the real PostgreSQL
	$(CARGO) build --workspace
	$(MAKE) --no-print-directory fixtures
	$(CARGO) test --workspace

fuzz: ## the fuzz test against a real daisy serve for 10 minutes (CI runs it for 60 s in make test)
	DAISY_FUZZ_SECS=$${DAISY_FUZZ_SECS:-600} $(CARGO) test -p proxy --test it fuzz -- --nocapture

soak: ## DAISY_SOAK_SECS (600) of load with random faults (broker, database, worker, serve, crashing plugins), then a report
	DAISY_SOAK_SECS=$${DAISY_SOAK_SECS:-600} $(CARGO) test -p post-submission --test layer soak -- --ignored --nocapture

bench: ## release build, every load scenario and the micro-benchmarks; writes target/bench/
	$(CARGO) build --release --workspace
	target/release/daisy-bench
	$(CARGO) bench -p bench --bench micro

bench-quick: ## every load scenario for a few seconds, to check the harness works
	$(CARGO) build --release --workspace
	target/release/daisy-bench --quick

bench-ab: ## this build's serve against another build's, in alternate rounds: make bench-ab AGAINST=/path/to/other/daisy
	@test -n "$(AGAINST)" || { echo "usage: make bench-ab AGAINST=/path/to/other/daisy"; exit 2; }
	$(CARGO) build --release --workspace
	target/release/daisy-bench ab --against $(AGAINST)

lint: ## rustfmt, clippy and plugin-api's docs, warnings as errors
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc -p plugin-api --no-deps

check-ops: ## promtool: the alert rules are valid and their unit tests pass
	promtool check rules ops/prometheus/alerts.yml
	cd ops/prometheus && promtool test rules alerts_test.yml

deny: ## cargo-deny: licenses, banned crates and sources (deny.toml)
	$(CARGO) deny check licenses bans sources

audit: ## cargo-deny's advisory check against the RustSec database (needs the network)
	$(CARGO) deny check advisories

check-schema: ## diesel CLI: migration run, redo and print-schema match the committed schema
	scripts/check-schema.sh

ci: lint check-ops test check-schema demo ## everything .ci/run checks
