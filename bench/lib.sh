# shellcheck shell=bash
# Helpers shared by the bench scripts; each sources it first thing:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# It sets ROOT (the checkout), BENCH_DIR (where benches keep their state, `bench/out`
# unless set) and BIN (the release binaries), and defines the functions below. Messages
# name the script that sourced it.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/bench/out}
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
BENCH_NAME=bench/$(basename "$0")

say() { printf '==> %s\n' "$*" >&2; }
die() { printf '%s: %s\n' "$BENCH_NAME" "$*" >&2; exit 1; }

# need CMD...: every command must be on PATH (GNU time must be /usr/bin/time: the shell's
# `time` keyword cannot report memory).
need() {
    local c
    for c in "$@"; do
        if [[ $c == time ]]; then
            [[ -x /usr/bin/time ]] || die "GNU time is required (apt-get install time)"
        else
            command -v "$c" >/dev/null || die "$c is required (scripts/install-deps.sh)"
        fi
    done
}

# build PACKAGE...: release build of the workspace packages, unless BENCH_NO_BUILD=1.
build() {
    [[ ${BENCH_NO_BUILD:-0} == 1 ]] && return
    say "building release binaries"
    local args=() p
    for p in "$@"; do args+=(-p "$p"); done
    (cd "$ROOT" && cargo build --release --quiet "${args[@]}")
}

# Processes the script started; `stop_started` (in its EXIT trap) ends them.
PIDS=()
stop_started() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
now() { date +%s.%N; }
# since T0: seconds from T0 (a `now`) until now, two decimals.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}'; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
# ratio A B: A / B as "1.23x" ("-" when either is missing).
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b > 0) printf "%.2fx", a / b; else print "-" }'; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_coordinator CONFIG LOG: starts `coordinator serve --config CONFIG`, appending its
# output to LOG, and waits for it to say where it listens: sets URL and COORD_PID (also
# added to PIDS). Only what the new process writes counts, so LOG may hold earlier runs.
start_coordinator() {
    local config=$1 log=$2 from deadline=$((SECONDS + 30))
    from=$(($( [[ -f $log ]] && stat -c %s "$log" || echo 0) + 1))
    "$BIN/coordinator" serve --config "$config" >>"$log" 2>&1 &
    COORD_PID=$!
    PIDS+=("$COORD_PID")
    URL=""
    while :; do
        URL=$(tail -c "+$from" "$log" | grep -a -m1 -o 'coordinator listening on https://[^ ]*' | awk '{print $4}' || true)
        [[ -n $URL ]] && return
        kill -0 "$COORD_PID" 2>/dev/null || { tail -n 20 "$log" >&2; die "the coordinator exited (log: $log)"; }
        ((SECONDS < deadline)) || die "the coordinator did not report its address within 30 s (log: $log)"
        sleep 0.05
    done
}
