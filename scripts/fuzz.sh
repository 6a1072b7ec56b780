#!/usr/bin/env bash
# Fuzzes every decoder for a bounded time (FUZZ_SECONDS per target, default 60) with cargo-fuzz
# (needs a nightly toolchain; installs cargo-fuzz if missing). Not part of the test command: the
# same decoders run the corpus and 20 000 mutations of it there, on stable
# (common/tests/fuzz_corpus.rs). Runs on a copy of the corpus, so the tracked seeds stay small;
# a crash leaves its input in fuzz/artifacts/<target>/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${FUZZ_SECONDS:-60}"
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz.sh needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo +nightly install cargo-fuzz --locked
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
for target in wire_datagram wire_header bootstrap_frames secure_packets topology_toml ts_splitter; do
  cp -r "fuzz/corpus/$target" "$work/$target"
  echo "== $target (${secs} s)"
  if ! (cd fuzz && cargo +nightly fuzz run "$target" "$work/$target" -- \
        -max_total_time="$secs" -print_final_stats=1 2>&1 | tail -n 12); then
    failed+=("$target")
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "every target ran ${secs} s without a crash"
