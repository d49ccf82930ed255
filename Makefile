# Entry points for people and CI. `make test` is exactly what CI runs (.ci/run).
.DEFAULT_GOAL := help
.PHONY: help tools test up bench chaos fmt lint

help: ## List the targets
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN { FS = ":.*## " } { printf "  make %-6s %s\n", $$1, $$2 }'

tools: ## Install the pinned nats-server into .tools/nats
	scripts/install-nats.sh

test: ## Run every check and test: fmt, clippy, build, tests on real NATS and PostgreSQL
	scripts/test.sh

up: ## Run the whole system locally until Ctrl-C (flags: make up ARGS='--store postgres --cluster')
	cargo build --release --bins
	"$${CARGO_TARGET_DIR:-target}/release/orderflow" up $(ARGS)

bench: tools ## Measure every standard scenario and rewrite docs/benchmarks.md (~30 min, wants a quiet machine)
	scripts/install-postgres.sh >/dev/null
	cargo build --release --bins
	"$${CARGO_TARGET_DIR:-target}/release/orderflow" bench --write-doc docs/benchmarks.md $(ARGS)

chaos: tools ## The chaos suite's full tier on SQLite and PostgreSQL, printing the table of docs/reliability.md (~12 min)
	scripts/install-postgres.sh >/dev/null
	cargo build --release --bins
	"$${CARGO_TARGET_DIR:-target}/release/chaos" --tier full --backend both --markdown $(ARGS)

fmt: ## Format the code
	cargo fmt --all

lint: ## Check formatting and run clippy with warnings as errors
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
