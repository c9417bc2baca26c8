#!/usr/bin/env bash
# Everything the GPU machine has to say, in one call: environment, tests, compute-sanitizer, benchmarks.
#
#   scripts/gpu_check.sh                      # all steps: env tests sanitize bench decode bounds
#   scripts/gpu_check.sh env tests sanitize   # correctness only (~5-7 min)
#   scripts/gpu_check.sh env bench decode bounds  # performance only (~6-9 min)
#   scripts/gpu_check.sh env ab               # same-card A/B of AB_CMD against ab_base/ (scripts/ab_prepare.sh)
#   AB_PATCH=benchmarks/candidates/X.patch scripts/gpu_check.sh env tests ab   # a candidate: tests, then A/B vs this tree
#   scripts/gpu_check.sh env profile          # device time per kernel (scripts/kernel_times.py, PROFILE_ARGS)
#   scripts/gpu_check.sh env configs          # every autotune config of every kernel (scripts/check_configs.py)
#   scripts/gpu_check.sh env tiles            # the selected branch against its rows per program (selected_tiles.py)
#   scripts/gpu_check.sh env ncu              # Nsight Compute on one kernel (NCU_KERNEL, NCU_CMD, NCU_METRICS; clocks untouched)
#
# Each step has its own timeout and a failing step does not stop the next. The whole script keeps to
# BUDGET_S seconds (default 570, under the 10-minute limit of one GPU command): a step gets at most what
# is left, and the benchmark's --max-minutes shrinks to fit. Files written under $OUT (default /tmp/out),
# summary.txt env.txt tests.log sanitizer.log bench.log results.tar (bench.json decode.json bounds.json, plots).
# The summary and the benchmark tables are printed last.
#
# Environment: OUT, BUDGET_S, PYTHON (python3), TEST_TIMEOUT (240 s: every test process ends by then;
# the files run in parallel, their large-shape parts one after another on a card under 100 GB), TEST_FILES,
# TEST_K (a pytest -k expression for every test file, e.g. "gpu_large or replays"), HYPOTHESIS_PROFILE (gpu),
# SANITIZE_TIMEOUT (90 s per run),
# SANITIZE_MATCH (only the sanitizer runs whose command matches this extended regex, e.g. "sparse|decode"),
# BENCH_MINUTES (6, the most the benchmark gets), DECODE_TIMEOUT (150 s), BOUNDS_TIMEOUT (120 s),
# BENCH_ARGS, DECODE_ARGS, BOUNDS_ARGS (extra flags), AB_CMD and AB_TIMEOUT (90 s per run, twice that in round 1) for the ab step
# (not in the default steps: it needs ab_base/ from scripts/ab_prepare.sh, or AB_PATCH: a candidate patch that
# this tree, copied to ab_base/ first, is patched with before any step, so the tests run the candidate too).
# TILES_ARGS and TILES_TIMEOUT (420 s: it autotunes each row tile) for the tiles step.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/out}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-570}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
SANITIZE_TIMEOUT=${SANITIZE_TIMEOUT:-90}
BENCH_MINUTES=${BENCH_MINUTES:-6}
DECODE_TIMEOUT=${DECODE_TIMEOUT:-150}
BOUNDS_TIMEOUT=${BOUNDS_TIMEOUT:-120}
AB_TIMEOUT=${AB_TIMEOUT:-90}
STEPS=${*:-env tests sanitize bench decode bounds}
START=$(date +%s)
RESULTS=$(mktemp -d)
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

want() { [[ " $STEPS " == *" $1 "* ]]; }
remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

# run_step NAME LIMIT_S LOG CMD...: run CMD under min(LIMIT_S, what is left) seconds, append to LOG,
# and add one status line to the summary.
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left
    left=$(remaining)
    if ((left < 30)); then
        printf '%-34s %-14s\n' "$name" "SKIPPED budget" >>"$SUMMARY"
        return
    fi
    ((limit > left - 15)) && limit=$((left - 15))
    local t0 rc status
    t0=$(date +%s)
    echo "=== $name (timeout ${limit}s): $*" >>"$log"
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAILED rc=$rc" ;;
    esac
    printf '%-34s %-14s %4ss  %s\n' "$name" "$status" "$(($(date +%s) - t0))" "$(basename "$log")" >>"$SUMMARY"
}

if want env; then
    {
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
        "$PY" -c "import sys, torch, triton; p = torch.cuda.get_device_properties(0); print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, '|', p.name, p.multi_processor_count, 'SMs, L2', getattr(p, 'L2_cache_size', 0) // 2**20, 'MiB')"
        command -v compute-sanitizer && compute-sanitizer --version | tail -1
    } >"$OUT/env.txt" 2>&1
    head -c 300 "$OUT/env.txt" | grep -m1 -o 'Driver Version: [0-9.]*' >>"$SUMMARY"
    grep -m1 '^python' "$OUT/env.txt" >>"$SUMMARY"
fi

if [[ -n ${AB_PATCH:-} ]]; then
    # a candidate patch: main's code (this tree) becomes ab_base/, then the patch is applied to the tree, so that
    # the tests and the ab step that follow run the candidate (no local scripts/ab_prepare.sh, no carry)
    rm -rf ab_base && mkdir ab_base && cp -r optimized reference benchmarks scripts ab_base/
    if (command -v git >/dev/null && git apply "$AB_PATCH") || patch -p1 --forward <"$AB_PATCH" >/dev/null; then
        printf '%-34s %-14s\n' "patch $(basename "$AB_PATCH")" "applied" >>"$SUMMARY"
    else
        printf '%-34s %-14s\n' "patch $(basename "$AB_PATCH")" "FAILED" >>"$SUMMARY"
        exit 1
    fi
fi

if want tests; then
    # the kernels' tests natively (the reference's tests are CPU-only and run in CI), one pytest per file, all
    # files at once: compiling a kernel for every drawn shape is CPU-bound, so the files compile in parallel.
    # One autotune config per kernel, since hypothesis draws many shapes and tuning each would eat the budget.
    TEST_FILES=${TEST_FILES:-$(ls tests/test_optimized_*.py tests/test_benchmarks.py)}
    LOGS=$(mktemp -d)
    t0=$(date +%s)
    limit=$(($(remaining) - 20))
    ((limit > TEST_TIMEOUT)) && limit=$TEST_TIMEOUT
    # a file with large-shape GPU cases (test_*_gpu_large) runs as two processes, those and the rest (the
    # property tests), so that the longest file no longer bounds the wall time alone. On a card under 100 GB the
    # large-shape parts run one after another: each holds float64 references of up to 45 GB, and side by side
    # they ran an 80 GB H100 out of memory (ninth session); there, split TEST_FILES over calls.
    deadline=$(($(date +%s) + limit))
    run_part() {  # run_part FILE [K]: pytest FILE (-k K, and TEST_K) until the deadline, log and exit status to $LOGS
        local log=$LOGS/$(basename "$1" .py)${2:+-${2// /-}}.log left=$((deadline - $(date +%s)))
        local k=${2:-}
        [[ -n ${TEST_K:-} ]] && k="(${TEST_K})${k:+ and ($k)}"
        ((left < 1)) && left=1
        HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu} NSA_AUTOTUNE=0 timeout -k 10 "$left" \
            "$PY" -m pytest "$1" ${k:+-k "$k"} -q -p no:cacheprovider --durations=5 >"$log" 2>&1
        echo "rc=$?" >>"$log"
    }
    large=()
    for f in $TEST_FILES; do
        if grep -q "gpu_large" "$f"; then
            large+=("$f")
            run_part "$f" "not gpu_large" &
        else
            run_part "$f" &
        fi
    done
    mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n1)
    if ((${mib:-0} >= 100000)); then
        for f in "${large[@]}"; do run_part "$f" "gpu_large" & done
    else
        (for f in "${large[@]}"; do run_part "$f" "gpu_large"; done) &
    fi
    wait
    for log in "$LOGS"/*.log; do
        rc=$(tail -n1 "$log" | sed 's/rc=//')
        case $rc in 0) status=ok ;; 5) status="none selected" ;; 124 | 137) status=TIMEOUT ;; *) status="FAILED rc=$rc" ;; esac
        printf '%-34s %-14s %s\n' "pytest $(basename "$log" .log)" "$status" \
            "$(grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -1)" >>"$SUMMARY"
    done
    printf '%-34s %4ss\n' "pytest wall time" "$(($(date +%s) - t0))" >>"$SUMMARY"
    cat "$LOGS"/*.log >"$OUT/tests.log"
fi

if want sanitize; then
    SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
    # the decode kernels through the decode test's ragged-batch property test (3 drawn cases and the pinned one)
    SANITIZE_RUNS=("scripts/sanitize_dense.py" "scripts/sanitize_sparse.py"
        "-m pytest tests/test_optimized_decode.py -q -p no:cacheprovider -p no:randomly -k equals_parallel")
    for run in "${SANITIZE_RUNS[@]}"; do
        [[ $run =~ ${SANITIZE_MATCH:-.} ]] || continue
        name=$(basename "$(awk '{ print ($1 == "-m") ? $3 : $1 }' <<<"$run")")
        if [[ -z $SANITIZER ]]; then
            printf '%-34s %-14s\n' "sanitize $name" "SKIPPED no compute-sanitizer" >>"$SUMMARY"
            continue
        fi
        for tool in memcheck racecheck; do
            # without the caching allocator every tensor is its own allocation, so memcheck sees overruns
            # shellcheck disable=SC2086 # run is a list of arguments
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 HYPOTHESIS_PROFILE=gpu-quick run_step "$tool $name" "$SANITIZE_TIMEOUT" \
                "$OUT/sanitizer.log" "$SANITIZER" --tool "$tool" --error-exitcode 3 --print-limit 20 "$PY" $run
            grep -E '(ERROR|RACECHECK) SUMMARY' "$OUT/sanitizer.log" | tail -1 | sed 's/^/    /' >>"$SUMMARY"
        done
    done
fi

if want bench; then
    reserve=30
    want decode && reserve=$((reserve + DECODE_TIMEOUT))
    want bounds && reserve=$((reserve + BOUNDS_TIMEOUT))
    secs=$(($(remaining) - reserve - 60))
    ((secs > BENCH_MINUTES * 60)) && secs=$((BENCH_MINUTES * 60))
    if ((secs < 60)); then
        printf '%-34s %-14s\n' "benchmarks.run" "SKIPPED budget" >>"$SUMMARY"
    else
        minutes=$(awk "BEGIN { printf \"%.1f\", $secs / 60 }")
        # shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
        run_step "benchmarks.run --max-minutes $minutes" $((secs + 60)) "$OUT/bench.log" \
            "$PY" -m benchmarks.run --max-minutes "$minutes" --out "$RESULTS" ${BENCH_ARGS:-}
    fi
fi

if want decode; then
    # shellcheck disable=SC2086 # DECODE_ARGS is a list of flags
    run_step "benchmarks.decode --quick" "$DECODE_TIMEOUT" "$OUT/bench.log" \
        "$PY" -m benchmarks.decode --quick --max-minutes $(((DECODE_TIMEOUT - 40) / 60 + 1)) --out "$RESULTS" ${DECODE_ARGS:-}
fi

if want bounds; then
    # shellcheck disable=SC2086 # BOUNDS_ARGS is a list of flags
    run_step "benchmarks.bounds" "$BOUNDS_TIMEOUT" "$OUT/bench.log" "$PY" -m benchmarks.bounds --out "$RESULTS" ${BOUNDS_ARGS:-}
fi

if want configs; then
    # every autotune config of every kernel, forced one at a time (not in the default steps: ~5 min)
    # shellcheck disable=SC2086 # CONFIGS_ARGS is a list of flags
    run_step "check_configs" "${CONFIGS_TIMEOUT:-330}" "$OUT/configs.log" "$PY" scripts/check_configs.py ${CONFIGS_ARGS:-}
    grep -cE ' ok$' "$OUT/configs.log" | sed 's/^/    configs ok: /' >>"$SUMMARY"
    grep -E 'FAILED|skipped' "$OUT/configs.log" | head -n 20 | cut -c1-200 | sed 's/^/    /' >>"$SUMMARY"
fi

if want tiles; then
    # the selected branch's forward and backward with larger row tiles (not in the default steps)
    # shellcheck disable=SC2086 # TILES_ARGS is a list of flags
    run_step "selected_tiles" "${TILES_TIMEOUT:-420}" "$OUT/tiles.log" "$PY" scripts/selected_tiles.py --out "$RESULTS" \
        ${TILES_ARGS:---lengths 8192 65536 --configs default g4 paper_dims --rows 32 64}
fi

if want profile; then
    # device time per kernel (not in the default steps): where the core's fwd+bwd and a decode step spend it
    # shellcheck disable=SC2086 # PROFILE_ARGS is a list of flags
    run_step "kernel_times" "${PROFILE_TIMEOUT:-150}" "$OUT/profile.log" "$PY" scripts/kernel_times.py --out "$RESULTS" \
        ${PROFILE_ARGS:---core default 65536 --decode default 1 65536 --decode default 32 65536}
fi

if want ncu; then
    # hardware counters of one kernel launch (not in the default steps): by default the decode step's compressed
    # pass at batch 32 and 64k. --clock-control none: the card's clocks are never changed (device METHOD.md)
    NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
    if [[ -z $NCU ]]; then
        printf '%-34s %-14s\n' "ncu" "SKIPPED no ncu" >>"$SUMMARY"
    else
        # shellcheck disable=SC2086 # NCU_CMD is a list of arguments
        # NCU_METRICS: more metrics, e.g. "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" (the
        # stall reasons, warps per issued instruction; the summary lists the largest)
        run_step "ncu ${NCU_KERNEL:-decode_compressed}" "${NCU_TIMEOUT:-150}" "$OUT/ncu.log" "$NCU" --clock-control none \
            --set "${NCU_SET:-detailed}" ${NCU_METRICS:+--metrics "$NCU_METRICS"} \
            -k "regex:${NCU_KERNEL:-decode_compressed}" -c "${NCU_COUNT:-1}" "$PY" \
            ${NCU_CMD:-scripts/kernel_times.py --decode default 32 65536 --warmup 0 --iters 1}
    fi
fi

if want ab; then
    # same-card A/B: AB_CMD (a python script and its flags, relative to a repository root) under ab_base/ (made
    # by scripts/ab_prepare.sh REV) and under the working tree, alternately, twice each
    AB_CMD=${AB_CMD:-scripts/selection_tiles.py --lengths 65536 --configs default meanpool64 g4 --chunks 16}
    if [[ ! -d ab_base ]]; then
        printf '%-34s %-14s\n' "ab" "SKIPPED no ab_base/ (scripts/ab_prepare.sh)" >>"$SUMMARY"
    else
        for round in 1 2; do
            for side in base tree; do
                root=$([[ $side == base ]] && echo ab_base || echo .)
                echo "=== ab $side round $round" >>"$OUT/ab.log"
                # shellcheck disable=SC2086 # AB_CMD is a list of arguments
                # round 1 also compiles each tree's kernels (their sources differ, so no shared cache): twice the time
                limit=$((round == 1 ? 2 * AB_TIMEOUT : AB_TIMEOUT))
                run_step "ab $side round $round" "$limit" "$OUT/ab.log" "$PY" "$root"/$AB_CMD --out "$RESULTS/ab_${side}_$round"
            done
        done
    fi
fi

if compgen -G "$RESULTS/*" >/dev/null; then
    tar -cf "$OUT/results.tar" -C "$RESULTS" $(cd "$RESULTS" && ls)
fi
printf 'total %ss of %ss budget; files: %s\n' "$(($(date +%s) - START))" "$BUDGET_S" "$(cd "$OUT" && ls | tr '\n' ' ')" >>"$SUMMARY"

if [[ -f $OUT/bench.log ]]; then
    echo "----- benchmark tables"
    # each benchmark prints its table last, starting with "card:"
    awk '/^=== /{keep=0} /^card:/{keep=1} keep' "$OUT/bench.log" | tail -n 80
fi
if [[ -f $OUT/bench.log ]] && grep -q '^error:' "$OUT/bench.log"; then
    echo "----- benchmark errors (first 20, cut to 300 characters)"
    grep '^error:' "$OUT/bench.log" | head -n 20 | cut -c1-300
fi
if [[ -f $OUT/tiles.log ]]; then
    echo "----- selected branch against its rows per program"
    grep -E ' T= *[0-9]+ rows=' "$OUT/tiles.log" | head -n 40
fi
if [[ -f $OUT/profile.log ]]; then
    echo "----- device time per kernel"
    grep -E '^(==|  )' "$OUT/profile.log" | head -n 60
fi
if [[ -f $OUT/ncu.log ]]; then
    echo "----- Nsight Compute (main metrics)"
    grep -E '^  [a-z_]+_kernel|Duration|DRAM Throughput|Memory Throughput|L2 Cache Throughput|Compute \(SM\)|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit' \
        "$OUT/ncu.log" | head -n 40
    if grep -q 'issue_stalled' "$OUT/ncu.log"; then
        echo "----- stall reasons (warps per issued instruction, largest first)"
        grep -E 'issue_stalled_[a-z_]+_per_issue_active\.ratio' "$OUT/ncu.log" | sort -k3 -g -r | head -n 12
    fi
fi
if [[ -f $OUT/ab.log ]]; then
    echo "----- A/B (base = ab_base/, tree = the working tree)"
    grep -E '^=== ab|^optimized from| ms |^B=|^ +[0-9]+ +(fwd|bwd) ' "$OUT/ab.log" | grep -v timeout | tail -n 40
fi
if [[ -f $OUT/tests.log ]]; then
    echo "----- test failures (first 40 lines)"
    grep -E '^(FAILED|ERROR)' "$OUT/tests.log" | head -n 40
fi
echo "----- summary"
cat "$SUMMARY"
