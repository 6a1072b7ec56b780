#!/usr/bin/env bash
# The project's test command (README, and CI through .ci/run): installs what the tests need,
# then checks formatting, lints, and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests use real FFmpeg output (and ffprobe); the picture test (lab/tests/picture.rs) plays
# the demo in mpv on an Xvfb display and takes screenshots with xwd (x11-apps). Install what is
# missing (Debian packages), and iproute2 for the multi-host test.
need=()
if ! command -v ffmpeg >/dev/null 2>&1 || ! command -v ffprobe >/dev/null 2>&1; then need+=(ffmpeg); fi
if ! command -v mpv >/dev/null 2>&1; then need+=(mpv); fi
if ! command -v Xvfb >/dev/null 2>&1; then need+=(xvfb); fi
if ! command -v xwd >/dev/null 2>&1; then need+=(x11-apps); fi
# lab/tests/netns.rs puts every host in its own network namespace (`ip netns`, as root).
if ! command -v ip >/dev/null 2>&1; then need+=(iproute2); fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "not found: installing ${need[*]} (Debian packages)" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast
