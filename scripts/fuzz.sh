#!/usr/bin/env bash
# Fuzzes every decoder with cargo-fuzz (libFuzzer) for a bounded time each: FUZZ_SECONDS per
# target (default 60). Needs a nightly toolchain; installs cargo-fuzz if missing. Not part of the
# test command: there the same drivers (fuzz/targets.rs) run the seed corpus and 20 000 seeded
# mutations per target on stable (common/tests/fuzz_corpus.rs).
#
#   bash scripts/fuzz.sh                      # every target, 60 s each
#   FUZZ_SECONDS=10 bash scripts/fuzz.sh      # every target, 10 s each
#   bash scripts/fuzz.sh wire_datagram ...    # only these targets
#
# Each target runs on a copy of fuzz/corpus/<target>/ in a temporary directory, so the tracked
# seeds stay as they are. A crash fails the script; its input is left in
# fuzz/artifacts/<target>/ (replay: cd fuzz && cargo +nightly fuzz run <target> <file>).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${FUZZ_SECONDS:-60}"
case "$secs" in '' | *[!0-9]*) echo "FUZZ_SECONDS must be a number of seconds" >&2; exit 2 ;; esac

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz.sh needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  targets=()
  for f in fuzz/fuzz_targets/*.rs; do
    targets+=("$(basename "$f" .rs)")
  done
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Debug assertions on (overflow checks too): an arithmetic overflow in a decoder is a crash.
flags=(--debug-assertions)
if [ "$#" -eq 0 ]; then
  (cd fuzz && cargo +nightly fuzz build "${flags[@]}")
else
  for t in "${targets[@]}"; do (cd fuzz && cargo +nightly fuzz build "${flags[@]}" "$t"); done
fi

summary=()
failed=()
for t in "${targets[@]}"; do
  if [ ! -d "fuzz/corpus/$t" ]; then
    echo "no fuzz/corpus/$t: unknown target $t" >&2
    exit 2
  fi
  cp -r "fuzz/corpus/$t" "$work/$t"
  log="$work/$t.log"
  echo "== $t: ${secs} s on $(find "fuzz/corpus/$t" -type f | wc -l) seeds"
  status=ok
  (cd fuzz && cargo +nightly fuzz run "${flags[@]}" "$t" "$work/$t" -- \
    -max_total_time="$secs" -print_final_stats=1) >"$log" 2>&1 || status=CRASH
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
  cov="$(sed -n 's/.* cov: \([0-9]*\) .*/\1/p' "$log" | tail -n 1)"
  grown="$(find "$work/$t" -type f | wc -l)"
  line="$(printf '%-18s %-5s %10s runs %8s exec/s  cov %6s  corpus %s' \
    "$t" "$status" "${runs:-?}" "${rate:-?}" "${cov:-?}" "$grown")"
  echo "$line"
  summary+=("$line")
  if [ "$status" != ok ]; then
    failed+=("$t")
    echo "---- $t log (tail) ----"
    tail -n 60 "$log"
    echo "-----------------------"
  fi
done

echo
echo "targets run (${secs} s each):"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "crashes in: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
  exit 1
fi
echo "no crashes"
