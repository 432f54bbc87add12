#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of the startup packet decision, the client
# and server scanners, the prepared-statement tracker and the sniffer: builds the targets in
# fuzz/ and runs each for EXECUTIONS executions, one after another, then prints executions
# and findings per target. Exits 1 if any target found something.
#
#   scripts/fuzz.sh                       # every target, 1,000,000 executions each
#   scripts/fuzz.sh 10000000              # 10 million each
#   TARGETS="sniff tracker" scripts/fuzz.sh 20000
#
# The corpus grows in fuzz/corpus/TARGET (kept between runs), findings go to
# fuzz/artifacts/TARGET/ (crash-*, timeout-*, oom-*). Replay one with
#   fuzz/target/x86_64-unknown-linux-gnu/release/TARGET fuzz/artifacts/TARGET/crash-...
# and minimize it with `... -minimize_crash=1 -runs=100000 crash-...`.
#
# Stable Rust: with `--sanitizer none` cargo-fuzz passes only stable flags (-Cpasses=sancov-module
# and -Cllvm-args for the coverage counters), so no nightly toolchain is needed. The crate has
# no unsafe code, so AddressSanitizer would only slow the runs; SANITIZER=address still works
# on stable through RUSTC_BOOTSTRAP=1 (for -Zsanitizer). Debug assertions and overflow checks
# are on (-a, and fuzz/Cargo.toml's release profile). Needs cargo-fuzz (installed from
# crates.io when missing) and a C++ compiler (libfuzzer-sys builds libFuzzer). One process
# at a time.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
RUNS=${1:-1000000}
TARGETS=${TARGETS:-"startup client_scan server_scan answer_alone sniff tracker"}
MAX_LEN=${MAX_LEN:-4096}

SANITIZER=${SANITIZER:-none}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
[ "$SANITIZER" = none ] || export RUSTC_BOOTSTRAP=1
cargo fuzz build --sanitizer "$SANITIZER" -O -a 2>&1 | grep -vE '^\s*(Compiling|Finished|Building|Blocking)' || true
BIN=target/x86_64-unknown-linux-gnu/release

# A few seeds the fuzzer would take long to build: real first packets (mode byte 0 = raw).
mkdir -p corpus/startup
printf '\0\0\0\0\x08\x04\xd2\x16\x2f\0\0\0\x25\0\x03\0\0user\0app\0database\0acme\0options\0-c x=1\0\0' > corpus/startup/seed-ssl-startup
printf '\0\0\0\0\x10\x04\xd2\x16\x2e\0\0\x30\x39\0\0\0\x07' > corpus/startup/seed-cancel

summary=()
found=0
for t in $TARGETS; do
  mkdir -p "corpus/$t" "artifacts/$t"
  before=$(ls "artifacts/$t" | wc -l)
  log="artifacts/$t.log"
  start=$(date +%s)
  rc=0
  "$BIN/$t" "corpus/$t" -runs="$RUNS" -max_len="$MAX_LEN" -timeout=10 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" >"$log" 2>&1 || rc=$?
  secs=$(( $(date +%s) - start ))
  execs=$(awk -F: '/stat::number_of_executed_units/{gsub(/ /,"",$2); print $2}' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}')
  new=$(( $(ls "artifacts/$t" | wc -l) - before ))
  if [ "$rc" -ne 0 ] || [ "$new" -gt 0 ]; then
    found=1
    echo "== $t: FINDING (exit $rc), see $log"
    grep -E 'panicked|ERROR: libFuzzer|Test unit written' "$log" | head -5 || true
  fi
  summary+=("$(printf '%-13s %12s executions %6ss  coverage %-6s findings %s' "$t" "${execs:-?}" "$secs" "${cov:-?}" "$new")")
done
printf '%s\n' "${summary[@]}"
exit "$found"
