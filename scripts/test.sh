#!/usr/bin/env bash
# The test command: formatting, lints (warnings are errors), then every test of the workspace.
# CI (.ci/run) calls exactly this; so should you before a commit.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
