#!/usr/bin/env bash
# The device session's runbook: the GPU work of a session in stages that each fit one `run`
# call (10 minutes) on the nvidia-h200 machine. The command of a call:
#
#     bash bench/device_session.sh STAGE [STAGE ...]        (timeout_s: 600)
#
# Stages, in the order to spend scarce device time (minutes on one H200, a cold machine):
#   tests     every sm_90 kernel precompiled; bench/diagnose.py smoke (small forward and
#             backward cases, each in a process with a time limit: a deadlocked kernel
#             shows as a TIMEOUT in seconds); then pytest -m gpu -n 8 over tests/ but the
#             JAX files (stage jax), a per-test timeout (30 s after a smoke hang);
#             $TESTS_PATHS (files or directories) narrows the GPU tests               ~2
#   sanitize  compute-sanitizer memcheck on small tests: reliability (huge cache lengths,
#             pages, wild block tables, append), forward and backward at head dims 64 and
#             128 (bf16), split-KV decode; $SANITIZE_K replaces that -k expression     ~3
#   jax       the JAX GPU tests, then bench/ring.py on one GPU (a ring of one against
#             cuflash.jax.attention)                                                     ~3
#   host      bench/host.py: host time per call against torch SDPA and JAX cuDNN          ~2
#   sweep     bench/sweep.py, bf16 then fp16, fwd and bwd, head dims 64/128/256 at
#             1k/4k/16k, against torch SDPA (cuDNN, FA2), JAX cuDNN and FA3 (the wheel in
#             .whl/); $SWEEP_IMPLS, $SWEEP_DTYPES, $SWEEP_HEADDIMS and $SWEEP_MODES
#             narrow the implementations, dtypes, head dims and modes (when device
#             time is short); stopped before the call's end (it writes its tables after
#             every row)                                                                <=9
#   options   bench/sweep.py, cuflash's backward alone against its variants (deterministic,
#             soft-cap, ALiBi: issue 14's bars 0.85x / 0.9x / 0.9x of the plain call), bf16
#             and fp16, head dims 64/128/256 at 4k/16k, causal and not                  ~4
#   jaxbench  bench/jax_bench.py: jitted cuflash.jax against cuflash on CuPy arrays, JAX
#             cuDNN and FA3, sweep shapes and per-call time at small shapes            ~3
#   tiles     bench/fwd_tiles.py: the forward's candidate tiles per head dim side by side,
#             which the tile table is chosen from; $TILES_HEADDIMS, $TILES_SEQLENS narrow
#             it                                                                       ~3
#   profile   ncu (--clock-control none) of one launch each of the Hopper forward and
#             backward at head dim 128 (the backward also at 16k, causal and not: the
#             causal gap to FA3 there) and of bwd_sm90_wide at 256, bf16: speed of light,
#             warp states, scheduler, memory and source-counter sections, the L2's
#             units, as text; each launch's source page (stall samples per SASS
#             instruction) as a gzipped CSV, which bench/ncu_source.py reads;
#             $PROFILE_SPECS picks other launches: "IMPL DIR KERNEL HD SEQLEN [causal];..."
#             ($PROFILE_DTYPE: bf16, or fp16 for every launch;
#             IMPL: diagnose.py calls' --impl, any sweep implementation: cuflash, its
#             variants, torch-cudnn, jax-cudnn, fa3; KERNEL "cudnn|sdpa" catches cuDNN's,
#             whose names vary by version: ncu's log prints the one it took)          ~4
#   kernels   bench/diagnose.py calls --kernels: each kernel of 10 back-to-back calls with
#             its time (CUPTI), $KERNEL_SPECS "IMPL DIR HD SEQLEN [causal];..." (default
#             cuflash and FA3 at hd128: bwd 16k causal, bwd 4k, fwd 4k), $KERNEL_DTYPE
#             (bf16): what a call is made of beside a peer's (preprocess, conversion)  ~1
#   clocks    bench/diagnose.py clocks: $CLOCK_IMPLS (cuflash,fa3) each for $CLOCK_SECONDS
#             (3) of back-to-back calls, alternately, with the SM clock, power and energy a
#             call (NVML) at $CLOCK_SPECS "DIR HD SEQLEN [causal];..." (fwd 4k, bwd 16k
#             causal, bwd 4k at hd128): what the power cap takes from each               ~2
#   ab        cuflash alone, this tree against each tree of $AB_TREES (default abtree: a
#             `git archive` of the base commit unpacked there, `mkdir abtree && git archive
#             2836a68 | tar -x -C abtree`, carried), alternately in $AB_PASSES passes (2;
#             every second one in the reverse order; more narrow a mean where a change is
#             1-3%): forward and backward ($AB_MODES: fwd,bwd) in $AB_DTYPES (bf16) at head dims
#             $AB_HEADDIMS (64,128) and seqlens $AB_SEQLENS (4096,16384), $AB_CAUSAL (both;
#             no or yes: a timing prototype whose causal turns would wait forever),
#             $AB_IMPLS (cuflash and its soft-cap and ALiBi calls); every table into ab.log
#             (`python bench/ab_table.py ab.log --spread`: means per tree, ratios)      ~8
#   abturns   the trees of ab in one process (sweep.py --trees: each tree's cuflash loaded
#             beside the others), their runs in turns, so that every tree meets the same
#             clock (the card slows as it warms); twice, the trees in one order and then
#             in the reverse one (one sweep reads identical trees up to 4% apart, at times
#             favouring the later one); the same $AB_* variables; each sweep.md's "Trees"
#             table has each tree's TFLOP/s, its runs' range and its ratio to the first
#             tree, and the log this tree's ratio to each other in both sweeps and their
#             geometric mean                                                            ~6
#   look      the first call when device time is scarce: bench/diagnose.py smoke, then
#             bench/sweep.py at bf16, head dims 64/128/256, 4k/16k, fwd and bwd, cuflash
#             and its deterministic mode against torch and JAX cuDNN and FA3          <=9
#   bisect    bench/diagnose.py smoke with cuflash from each tree of $BISECT_TREES (default:
#             every directory under bisect/, in name order), this tree's cases: which commit
#             a smoke failure of "tests" came in with. Trees from this machine, carried:
#             `git archive C cuflash kernels_cu | tar -x -C bisect/N-C` per commit C  ~2 a tree
# Stages named together share one call's time (9.5 minutes, then a stage is cut or
# skipped) and the 8 files a call brings back. Four calls: "tests", "sweep", "tiles host
# jaxbench" (8 files), "sanitize jax options"; a kernel change first "ab" (and "tests").
#
# FA3 for the sweep: once, in the checkout, `echo /.whl/ >> .git/info/exclude; python3 -m
# pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
# --platform manylinux_2_28_x86_64 -d .whl flash-attn3-jax==0.2.3 einops` (the wheel
# imports einops, which the device lacks); then carry: [".whl"] in each call.
#
# Each stage writes $OUT/STAGE.log (host, sweep and jax also their tools' reports under
# $OUT/STAGE/) and a line to $OUT/summary.txt, after one line of versions. Kernels compile
# into CUPY_CACHE_DIR=/tmp/cfcache, which lasts only while the machine stays warm (30 s
# after a call). Wheels in .whl/ (carry: [".whl"]) are installed first, e.g. a JAX peer.
# Set CUFLASH_COMMIT=<sha> in the command for host.py's record (no .git travels).
set -uo pipefail

OUT=${OUT:-/tmp/device_out}
BUDGET=${BUDGET:-570}  # seconds of the call's 600 this script may use (less: a call cut short)
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=/tmp/cfcache
export XLA_PYTHON_CLIENT_PREALLOCATE=false

summary() { echo "$1: $2" | tee -a "$OUT/summary.txt"; }

# Seconds left of the budget.
left() { echo $((BUDGET - SECONDS)); }

# run SECONDS LOG COMMAND...: the command under a time limit (10 s at least: timeout 0
# would be none), its output into LOG too.
run() {
    local limit=$(($1 > 10 ? $1 : 10)) log=$2
    shift 2
    timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$log"
}

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
summary versions "$(python3 - <<'EOF' 2>&1 | tail -n 1
import cupy, numpy, sys
from cupy_backends.cuda.libs import nvrtc
props = cupy.cuda.runtime.getDeviceProperties(0)
print(f"python {sys.version.split()[0]}, {props['name'].decode()}, driver "
      f"{cupy.cuda.runtime.driverGetVersion()}, cupy {cupy.__version__}, nvrtc "
      f"{nvrtc.getVersion()}, numpy {numpy.__version__}", end="")
for name in ("jax", "torch"):
    try:
        print(f", {name} {__import__(name).__version__}", end="")
    except ImportError:
        print(f", no {name}", end="")
print()
EOF
)"

# Every sm_90 kernel into CuPy's cache, once per machine: xdist workers would otherwise
# compile the same kernels side by side.
precompile() {
    [ -e /tmp/cfcache/.complete ] && return
    mkdir -p /tmp/cfcache
    if run "$(left)" "$OUT/$1.log" python3 -m cuflash.precompile --arch sm_90 --all -j 16 \
            | tail -n 1; then
        touch /tmp/cfcache/.complete
    fi
}

# The result line of a pytest log ("3 failed, 812 passed, 7 skipped in 301.2s").
pytest_result() {
    grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$1" | grep -E ' in [0-9.]+s' | tail -n 1
}

# pytest-timeout ends a test that hangs (a kernel that never finishes) and xdist goes on.
per_test_timeout() {
    python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=$1 --timeout-method=thread"
}

stage_tests() {
    precompile tests
    run 300 "$OUT/tests.log" python3 bench/diagnose.py smoke
    local smoke=$? limit=180  # pipefail: the tool's status (2: a case hung or crashed)
    summary smoke "$(grep -E '^smoke: |TIMEOUT|crashed' "$OUT/tests.log" | tr '\n' ' ')"
    # A hang or crash in smoke (2), or smoke cut by its limit: hung tests cost 30 s each.
    [ "$smoke" -ne 0 ] && [ "$smoke" -ne 1 ] && limit=30
    # Two BLAS threads a worker (16 cores, 8 workers): the host references of the decode
    # tests would otherwise start 16 each and wait on each other.
    # shellcheck disable=SC2046
    run $(($(left) - 5)) "$OUT/tests.log" env OPENBLAS_NUM_THREADS=2 python3 -m pytest -m gpu \
        -q -n 8 -p no:cacheprovider $(per_test_timeout $limit) --durations=30 \
        --ignore=tests/test_jax.py --ignore=tests/test_jax_ring.py ${TESTS_PATHS:-tests}
    summary tests "$(pytest_result "$OUT/tests.log")"
}

stage_sanitize() {
    precompile sanitize
    run $(($(left) - 5)) "$OUT/sanitize.log" compute-sanitizer --tool memcheck \
        --print-limit 20 python3 -m pytest -m gpu -q -p no:cacheprovider \
        tests/test_reliability_gpu.py tests/test_gpu_forward.py tests/test_gpu_backward.py \
        tests/test_kvcache.py -k "${SANITIZE_K:-huge or pages or wild or append or \
        test_gpu_num_splits or (test_headdims and bf16 and (64 or 128))}"
    summary sanitize "$(grep -E 'ERROR SUMMARY|Device not supported' "$OUT/sanitize.log" \
        | tail -n 1); pytest: $(pytest_result "$OUT/sanitize.log")"
}

stage_jax() {
    precompile jax
    # shellcheck disable=SC2046
    run $(($(left) / 2)) "$OUT/jax.log" python3 -m pytest -m gpu -q -p no:cacheprovider \
        $(per_test_timeout 240) tests/test_jax.py tests/test_jax_ring.py
    summary jax "$(pytest_result "$OUT/jax.log")"
    run $(($(left) - 5)) "$OUT/jax.log" python3 bench/ring.py --out "$OUT/jax" --gpus 1
    summary ring "$(tail -n 1 "$OUT/jax.log")"
}

stage_host() {
    run $(($(left) - 5)) "$OUT/host.log" python3 bench/host.py --out "$OUT/host" \
        ${CUFLASH_COMMIT:+--commit "$CUFLASH_COMMIT"}
    summary host "$(grep -E '^(fwd_small|fwd_large|decode|fwdbwd_small):' "$OUT/host.log" \
        | tr '\n' ';')"
}

stage_sweep() {
    precompile sweep
    run $(($(left) - 5)) "$OUT/sweep.log" python3 bench/sweep.py --out "$OUT/sweep" \
        --dtypes "${SWEEP_DTYPES:-bf16,fp16}" ${SWEEP_IMPLS:+--impls "$SWEEP_IMPLS"} \
        ${SWEEP_HEADDIMS:+--headdims "$SWEEP_HEADDIMS"} ${SWEEP_MODES:+--modes "$SWEEP_MODES"} \
        --stop-after $(($(left) - 60))
    summary sweep "$(grep -cE '^\[ *[0-9]+/' "$OUT/sweep.log") rows; $(grep -E \
        '^- (fwd|bwd|fwdbwd) ' "$OUT/sweep/sweep.md" 2>/dev/null | tr '\n' ' ')"
}

stage_options() {
    precompile options
    run $(($(left) - 5)) "$OUT/options.log" python3 bench/sweep.py --out "$OUT/options" \
        --impls cuflash,cuflash-det,cuflash-softcap,cuflash-alibi --dtypes bf16,fp16 \
        --headdims 64,128,256 --seqlens 4096,16384 --modes bwd --no-check \
        --stop-after $(($(left) - 60))
    summary options "$(grep -E '^- bwd ' "$OUT/options/sweep.md" 2>/dev/null | tr '\n' ' ')"
}

stage_tiles() {
    precompile tiles
    run $(($(left) - 5)) "$OUT/tiles.log" python3 bench/fwd_tiles.py --out "$OUT/tiles" \
        ${TILES_HEADDIMS:+--headdims "$TILES_HEADDIMS"} ${TILES_SEQLENS:+--seqlens \
        "$TILES_SEQLENS"} --stop-after $(($(left) - 60))
    summary tiles "$(grep -cE '^hd ' "$OUT/tiles.log") rows"
}

stage_jaxbench() {
    precompile jaxbench
    run $(($(left) - 5)) "$OUT/jaxbench.log" python3 bench/jax_bench.py \
        --out "$OUT/jaxbench" --stop-after $(($(left) - 60))
    summary jaxbench "$(grep -E '^- (sweep|small) ' "$OUT/jaxbench/jax.md" 2>/dev/null \
        | tr '\n' ' ')"
}

# ab and abturns: their variables' defaults (the header), and the sweep's arguments they share.
AB_TREES=${AB_TREES:-abtree} AB_PASSES=${AB_PASSES:-2}
AB_KERNELS=(--dtypes "${AB_DTYPES:-bf16}" --headdims "${AB_HEADDIMS:-64,128}")
AB_SWEEP=(--impls "${AB_IMPLS:-cuflash,cuflash-softcap,cuflash-alibi}" "${AB_KERNELS[@]}"
          --seqlens "${AB_SEQLENS:-4096,16384}" --causal "${AB_CAUSAL:-both}"
          --modes "${AB_MODES:-fwd,bwd}" --no-check)

# precompile_trees LOG: each tree's kernels of $AB_DTYPES at $AB_HEADDIMS into the cache, 16
# at a time (~10 s a tree), rather than one by one inside its first run. From inside the
# tree: `python3 -m` puts the working directory before PYTHONPATH, so from here it would
# compile this tree's kernels each time.
precompile_trees() {
    local tree
    for tree in $AB_TREES .; do
        (cd "$tree" && run $(($(left) - 120)) "$1" python3 -m cuflash.precompile \
            --arch sm_90 "${AB_KERNELS[@]}" -j 16) | tail -n 1
    done
}

stage_ab() {
    local pass tree
    precompile_trees "$OUT/ab.log"
    # Every second pass runs the trees in the reverse order: a machine that slows as it
    # warms would otherwise favour the tree that runs first (the fourteenth session's
    # control, the same kernels in two trees, read 1% lower in the second).
    local order
    order="$AB_TREES ."
    for pass in $(seq "$AB_PASSES"); do
        [ "$pass" -gt 1 ] && order=$(echo "$order" | tr ' ' '\n' | tac | tr '\n' ' ')
        for tree in $order; do
            [ "$(left)" -lt 120 ] && break 2
            echo "=== pass $pass: $tree" >> "$OUT/ab.log"
            rm -rf /tmp/ab
            PYTHONPATH=$tree:$PYTHONPATH run $(($(left) - 30)) "$OUT/ab.log" python3 \
                bench/sweep.py --out /tmp/ab "${AB_SWEEP[@]}" \
                --stop-after $(($(left) - 60)) > /dev/null
            cat /tmp/ab/sweep.md >> "$OUT/ab.log" 2>/dev/null
        done
    done
    local runs want
    runs=$(grep -c '^=== pass' "$OUT/ab.log")
    want=$((AB_PASSES * ($(echo $AB_TREES | wc -w) + 1)))
    if [ "$runs" -lt "$want" ]; then
        local why="stopped with $(left) s of BUDGET left; a run starts only with 120"
        summary ab "$runs of $want runs ($why)"
    else
        summary ab "$runs runs"
    fi
}

stage_abturns() {
    precompile_trees "$OUT/abturns.log"
    # Two sweeps, the trees in one order, then in the reverse one: one sweep reads identical
    # trees up to 4% apart, at times favouring the tree listed later (twenty-eighth
    # session), so a ratio is the geometric mean of the two (bench/ab_table.py --turns).
    local order swapped
    order=$(echo "$AB_TREES ." | tr ' ' ',')
    swapped=$(echo "$AB_TREES ." | tr ' ' '\n' | tac | paste -sd,)
    run $(($(left) / 2)) "$OUT/abturns.log" python3 bench/sweep.py --out "$OUT/abturns" \
        "${AB_SWEEP[@]}" --trees "$order" --stop-after $(($(left) / 2 - 30)) > /dev/null
    run $(($(left) - 10)) "$OUT/abturns.log" python3 bench/sweep.py \
        --out "$OUT/abturns_swapped" "${AB_SWEEP[@]}" --trees "$swapped" \
        --stop-after $(($(left) - 40)) > /dev/null
    # Into the log, which also holds both sweeps' tables: the count is of this one's rows.
    local ratios
    ratios=$(python3 bench/ab_table.py --turns "$OUT/abturns" "$OUT/abturns_swapped" 2>&1)
    echo "$ratios" >> "$OUT/abturns.log"
    summary abturns "$(grep -c '^| [fb]w' <<< "$ratios") rows of ratios in both orders"
}

stage_look() {
    run 240 "$OUT/look.log" python3 bench/diagnose.py smoke
    summary smoke "$(grep -E '^smoke: |TIMEOUT|crashed' "$OUT/look.log" | tr '\n' ' ')"
    run $(($(left) - 5)) "$OUT/look.log" python3 bench/sweep.py --out "$OUT/look" \
        --impls cuflash,cuflash-det,torch-cudnn,jax-cudnn,fa3 --dtypes bf16 \
        --seqlens 4096,16384 --stop-after $(($(left) - 60))
    summary look "$(grep -E '^- (fwd|bwd) ' "$OUT/look/sweep.md" 2>/dev/null | tr '\n' ' ')"
}

stage_bisect() {
    local tree
    for tree in ${BISECT_TREES:-$(ls -d bisect/*/ 2>/dev/null | sort)}; do
        [ "$(left)" -lt 90 ] && break
        echo "=== $tree" >> "$OUT/bisect.log"
        PYTHONPATH=$tree:$PYTHONPATH CUPY_CACHE_DIR=/tmp/cfcache-bisect run $(($(left) - 30)) \
            "$OUT/bisect.log" python3 bench/diagnose.py smoke > /dev/null
        summary "bisect $tree" "$(grep -E '^smoke: ' "$OUT/bisect.log" | tail -n 1)"
    done
}

stage_profile() {
    precompile profile
    local sections="--section SpeedOfLight --section WarpStateStats --section SchedulerStats"
    sections="$sections --section MemoryWorkloadAnalysis --section Occupancy"
    # The launch shape: grid, block, registers, shared memory (a peer's says how it tiles).
    sections="$sections --section LaunchStats"
    # Where the warps stall, by instruction: the source page of the report, exported below.
    sections="$sections --section SourceCounters"
    # Which unit of the L2 (tags, sectors, atomics) a memory-bound kernel is bound by.
    sections="$sections --metrics"
    sections="$sections breakdown:gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"
    # implementation, direction, kernel (a regex of the demangled name), head dim, seqlen,
    # and "causal" or nothing; specs separated by ";"
    local specs spec name
    specs=${PROFILE_SPECS:-"cuflash fwd flash_fwd_sm90 128 4096;cuflash bwd bwd_sm90 128 4096;\
cuflash bwd bwd_sm90 128 16384;cuflash bwd bwd_sm90 128 16384 causal;\
cuflash bwd bwd_sm90_wide 256 4096"}
    IFS=';' read -ra specs <<< "$specs"
    for spec in "${specs[@]}"; do
        # shellcheck disable=SC2086
        set -- $spec
        name="$1-$2-hd$4-$5${6:+-causal}-${PROFILE_DTYPE:-bf16}"
        echo "=== $spec" >> "$OUT/profile.log"
        # shellcheck disable=SC2086
        run $(($(left) / 3)) "$OUT/profile.log" ncu --clock-control none --launch-skip 2 \
            --launch-count 1 --kernel-name-base demangled -k "regex:$3" $sections -f \
            -o "/tmp/$name" python3 bench/diagnose.py calls "$2" --impl "$1" --headdim "$4" \
            --seqlen "$5" ${6:+--causal} --dtype "${PROFILE_DTYPE:-bf16}"
        ncu -i "/tmp/$name.ncu-rep" --page details >> "$OUT/profile.log" 2>&1
        # Per SASS instruction: executions and stall samples by reason (a CSV of ~1 MB).
        ncu -i "/tmp/$name.ncu-rep" --page source --csv 2>&1 | gzip > "$OUT/$name-source.csv.gz"
    done
    summary profile "$(grep -cE 'Duration|Compute \(SM\) Throughput' "$OUT/profile.log") lines"
}

# each_spec SPECS FN: FN with the words of each ";"-separated spec of SPECS, while 40 s of
# the budget are left.
each_spec() {
    local spec specs
    IFS=';' read -ra specs <<< "$1"
    for spec in "${specs[@]}"; do
        [ "$(left)" -lt 40 ] && break
        # shellcheck disable=SC2086
        "$2" $spec
    done
}

# implementation, direction, head dim, seqlen, and "causal" or nothing
kernels_spec() {
    echo "=== $* ${KERNEL_DTYPE:-bf16}" >> "$OUT/kernels.log"
    run $(($(left) - 10)) "$OUT/kernels.log" python3 bench/diagnose.py calls "$2" \
        --impl "$1" --headdim "$3" --seqlen "$4" ${5:+--causal} \
        --dtype "${KERNEL_DTYPE:-bf16}" --kernels 10 > /dev/null
}

stage_kernels() {
    each_spec "${KERNEL_SPECS:-"cuflash bwd 128 16384 causal;fa3 bwd 128 16384 causal;\
cuflash bwd 128 4096;fa3 bwd 128 4096;cuflash fwd 128 4096;fa3 fwd 128 4096"}" kernels_spec
    summary kernels "$(grep -c '^all kernels' "$OUT/kernels.log") specs"
}

# direction, head dim, seqlen, and "causal" or nothing
clocks_spec() {
    run $(($(left) - 10)) "$OUT/clocks.log" python3 bench/diagnose.py clocks "$1" \
        --headdim "$2" --seqlen "$3" ${4:+--causal} --dtype "${KERNEL_DTYPE:-bf16}" \
        --impls "${CLOCK_IMPLS:-cuflash,fa3}" --seconds "${CLOCK_SECONDS:-3}" > /dev/null
}

stage_clocks() {
    each_spec "${CLOCK_SPECS:-"fwd 128 4096;bwd 128 16384 causal;bwd 128 4096"}" clocks_spec
    summary clocks "$(grep -c ' causal\|seqlen' "$OUT/clocks.log") shapes"
}

[ $# -gt 0 ] || { sed -n '2,/^set /{/^#/p}' "$0"; exit 2; }
for stage in "$@"; do
    if ! declare -F "stage_$stage" >/dev/null; then
        summary "$stage" \
            "no such stage (tests, sanitize, jax, host, sweep, options, jaxbench, tiles, profile,"\
            "kernels, clocks, ab, abturns, look, bisect)"
    elif [ "$(left)" -lt 60 ]; then
        summary "$stage" "skipped: $(left) s of the call's budget left"
    else
        "stage_$stage"
    fi
done
