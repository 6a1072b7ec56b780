#!/usr/bin/env bash
# The project's test command (README, and CI through .ci/run): installs what the tests need,
# then checks formatting, lints, and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests use real FFmpeg output (and, later, ffprobe). Install it when missing.
if ! command -v ffmpeg >/dev/null 2>&1 || ! command -v ffprobe >/dev/null 2>&1; then
  echo "ffmpeg not found: installing it (Debian package 'ffmpeg')" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast
