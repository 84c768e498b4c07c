#!/usr/bin/env bash
# Everything a session with a GPU runs, in one device call of at most ~9 minutes (bench/results/README.md):
#
#   ../shared/gpu/prepare.sh                      # once, on the CPU machine: the wheels into .gpu-wheels/
#   run(carry=[".gpu-wheels"], timeout_s=600,
#       command="source .gpu-wheels/env.sh && GIT_COMMIT=<git describe --always --dirty --abbrev=40> bash bench/gpu_session.sh")
#
# Stages, in this order (all by default, or the ones named as arguments), each in its own time box so that one
# that hangs or overruns cannot take the others with it:
#   roofline  bench.roofline: a bf16 8192^3 matmul and a device copy, to read MFU against     (S_ROOFLINE=20 s)
#   host      bench.host_path: our functions' host time per call, launches stubbed, on CUDA tensors  (S_HOST=30 s)
#   tests     pytest on CUDA: CUDA graphs in the DeepSpeed step (also accumulating and evaluating), our kernels
#             inlined into Inductor's code (--inline-kernels) against the opaque operators, then
#             tests/test_gelu.py test_cross_entropy.py test_layer_norm.py test_attention.py (the kernels), the
#             model-level dropout mask replay at GPT-1 scale, no host sync in the default step, the ZeRO-2 bf16 mask
#             replay, then tests/test_compile.py  (S_TESTS=200 s)
#   e2e       bench.e2e: every row of ROWS, results rewritten after each row; each row carries its GPU anatomy
#             and its host anatomy (cProfile by package), so no profile stage is needed   (S_E2E=180 s, budget 150)
#             E2E_ONLY="row,row" runs only those rows (bench.e2e --only; names as in bench/e2e.py ROWS)
#   ops       bench.run_all --only attention,cross_entropy,layer_norm,gelu, with the e2e rows  (S_OPS=140 s, budget 110)
# The seconds are environment variables (S_E2E=180 ...); the defaults add up to about 540 s, under the 600 s of one device call.
# More stages run only when named, in a second device call (`bash bench/gpu_session.sh curves tune`):
#   profile   bench.profile_step: the default path, then the nanoGPT recipe, as text       (S_PROFILE=40 s each)
#   curves    bench.curves: 200 steps of the 117M model, each run against torch's kernels       (S_CURVES=260 s)
#             CURVES_RUNS picks the runs (default compiled,eager,compiled-graphs-ln, in that order, so
#             that a cut drops the last: ~30 s each on an H200, ~60 s compiled), CURVES_CONFIG
#             the DeepSpeed config (default ds_configs/zero0_autocast_bf16.json, the default path's); to bisect
#             the eager divergence where the H100 saw it: CURVES_CONFIG=ds_configs/zero2_bf16.json
#             CURVES_RUNS=eager,eager-attn,eager-loss,compiled S_CURVES=240
#             needs the corpus: `gpt1 prepare --out data/shakespeare` on the CPU machine, then
#             carry=[".gpu-wheels", "data/shakespeare"] (the GPU machine has no network)
#   probe     gpt1.train with CUDA graphs + fused LayerNorm, PROBE_STEPS=60 steps logged one by one, torch's
#             recompile / CUDA graph logs and a Python stack dump every PROBE_DUMP_S=30 s (needs the corpus, as
#             curves does)                                                                    (S_PROBE=100 s)
#   tune      bench.tune_attention: the attention launch table per sequence length and dropout    (S_TUNE=120 s)
#   ncu       bench.ncu: Nsight Compute on the first launch of each of our kernels at GPT-1's training shapes
#             (speed of light, occupancy, registers, stall reasons; ncu.txt holds ncu's own advice)   (S_NCU=90 s)
#   tune_ce   bench.tune_cross_entropy: the cross-entropy kernel's num_warps, loads in flight or row read once; a table with
#             entries is copied into this copy's kernels/, so that the stages named after it run with it (S_TUNE_CE=75 s)
# SMOKE=1 runs every stage's --smoke form on a CPU (pytest only collects): tests/test_bench.py checks the script.
#
# $OUT receives three files, rewritten after every stage (a run cut short still returns what it finished):
#   session.log   everything every stage printed
#   summary.md    stage statuses and times, roofline, pytest tail, the e2e tables and verdict, the profiles,
#                 the op benches' headline
#   results.tgz   every result file: e2e/ and ops/ (results.json, results.md, plots), profile/*.json|txt,
#                 roofline.json, pytest_cuda.txt, stages.txt
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-session}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/session.log
: > "$LOG"
STAGES=${*:-roofline host tests e2e ops}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
SMOKE_FLAG=""
PYTEST_MODE=""
if [ "${SMOKE:-0}" = 1 ]; then SMOKE_FLAG="--smoke"; PYTEST_MODE="--collect-only"; fi

say() { echo "[gpu_session $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# stage NAME SECONDS COMMAND...: run COMMAND under `timeout`, its output to the log and to stdout
stage() {
    local name=$1 seconds=$2; shift 2
    local t0=$SECONDS
    say "stage $name: start (time box ${seconds} s): $*"
    timeout -k 10 "$seconds" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local why=""
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && why=" (time box spent)"
    echo "$name rc=$rc in $((SECONDS - t0)) s$why" >> "$WORK/stages.txt"
    say "stage $name: rc=$rc in $((SECONDS - t0)) s$why"
    pack
}

section() {  # section TITLE FILE [sed range]: a file (or part of it) into the summary
    local title=$1 file=$2
    [ -s "$file" ] || return 0
    printf '\n## %s\n\n' "$title"
    if [ $# -ge 3 ]; then sed -n "$3" "$file"; else cat "$file"; fi
}

pack() {
    {
        echo "# GPU session: $(${PY} -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null || echo no GPU)"
        echo
        echo "commit $GIT_COMMIT; stages: $STAGES"
        echo
        echo '```'
        cat "$WORK/stages.txt" 2>/dev/null
        echo '```'
        section "roofline" "$WORK/roofline.txt"
        section "host path (bench.host_path)" "$WORK/host_path.md" '/^Host path/,$p'
        [ -s "$WORK/pytest_cuda.txt" ] && printf '\n## pytest on CUDA (tail)\n\n```\n%s\n```\n' "$(tail -n 15 "$WORK/pytest_cuda.txt")"
        [ -s "$WORK/pytest_failures.txt" ] && printf '\n## pytest failures, as they happened\n\n```\n%s\n```\n' \
            "$(head -c 12000 "$WORK/pytest_failures.txt")"
        section "end to end (bench.e2e)" "$WORK/e2e/results.md" '/^## End to end/,/^## Plots/p'
        for f in "$WORK"/profile/*.txt; do
            [ -s "$f" ] && printf '\n## %s\n\n```\n%s\n```\n' "$(basename "$f" .txt)" "$(sed -n '/^profile_step:/,$p' "$f" | tail -n 25)"
        done
        section "op benches (bench.run_all)" "$WORK/ops/results.md" '/^## Headline/,/^## Attention/p'
        section "loss curves (bench.curves)" "$WORK/curves/results.md"
        section "attention tuning (bench.tune_attention)" "$WORK/tune/attention_tuned.md"
        section "cross-entropy tuning (bench.tune_cross_entropy)" "$WORK/tune_ce/cross_entropy_tuned.md"
        section "Nsight Compute (bench.ncu)" "$WORK/ncu/ncu.md" '/^| kernel/,$p'
        if [ -s "$WORK/probe/train.log" ]; then
            printf '\n## gpt1.train probe (CUDA graphs + fused LayerNorm), end of its output\n\n```\n%s\n```\n' \
                "$(tail -c 6000 "$WORK/probe/train.log")"
        fi
    } > "$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
    tar czf "$OUT/results.tgz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}

GIT_COMMIT=$($PY -c 'from bench.common import git_commit; print(git_commit())' 2>/dev/null || echo unknown)
export GIT_COMMIT  # one commit for every stage's rows
[ "$GIT_COMMIT" = unknown ] && say "warning: no .git here and GIT_COMMIT unset: rows will say commit unknown"
say "stages: $STAGES; out: $OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit,memory.total --format=csv 2>&1 | tee -a "$LOG"
mkdir -p "$WORK/profile"
for s in $STAGES; do
    case $s in
    roofline)
        stage roofline "${S_ROOFLINE:-20}" $PY -m bench.roofline $SMOKE_FLAG --json "$WORK/roofline.json"
        grep '^roofline on' "$LOG" | tail -n 1 > "$WORK/roofline.txt" ;;
    host)
        stage host "${S_HOST:-30}" bash -c "$PY -m bench.host_path $SMOKE_FLAG --json '$WORK/host_path.json' \
            2>&1 | tee '$WORK/host_path.md'; exit \${PIPESTATUS[0]}" ;;
    tests)
        # CUDA graphs against the default compile first (with gradient accumulation and evaluation: what making
        # them the default needs), then the short-sequence attention kernels (a GPU's default at T <= 128 since
        # 757e9df, never run on one before), then the kernel files (new since the last GPU run: bias + GELU, the
        # cross-entropy's unrolled loads), then the other step-level checks; in the H200 run of d6fcf61 the kernel
        # files alone filled a 120 s box
        files="tests/test_runtime.py::test_cuda_graphs_train_like_the_default_compile
            tests/test_compile.py::test_inline_kernels_under_inductor_on_cuda
            tests/test_attention.py::test_short_launch_configs tests/test_model.py::test_short_attention_kernels_in_the_model
            tests/test_gelu.py tests/test_cross_entropy.py tests/test_layer_norm.py tests/test_attention.py
            tests/test_model.py::test_kernel_attention_dropout_gives_the_gradients_of_its_mask
            tests/test_runtime.py::test_default_training_step_never_waits_on_the_gpu
            tests/test_runtime.py::test_zero2_bf16_eager_kernels_follow_the_replayed_reference
            tests/test_bench.py::test_graph_ms_on_cuda
            $(ls tests/test_compile.py 2>/dev/null)"
        # pytest gets SIGINT 10 s before the box closes: it then prints the failures it has seen (a kill would
        # leave only the progress dots)
        # each failure is also written to pytest_failures.txt as it happens (tests/conftest.py): in the H200 run
        # of 53af6d7 the interrupted pytest printed nothing but its progress dots
        stage tests "${S_TESTS:-200}" env GPT1_TEST_FAILURES="$WORK/pytest_failures.txt" bash -c "timeout -s INT \
            $(( ${S_TESTS:-200} - 10 )) $PY -m pytest -q -p no:cacheprovider --tb=short -rfE --durations=15 \
            $PYTEST_MODE $(echo $files) 2>&1 | tee '$WORK/pytest_cuda.txt'; exit \${PIPESTATUS[0]}" ;;
    e2e)
        only=()
        [ -n "${E2E_ONLY:-}" ] && only=(--only "$E2E_ONLY")
        stage e2e "${S_E2E:-180}" $PY -m bench.e2e $SMOKE_FLAG --out "$WORK/e2e" --budget-s "${B_E2E:-150}" \
            ${only[@]+"${only[@]}"}
        if [ ! -s "$WORK/e2e/results.md" ] && [ -s "$WORK/e2e/results.json" ]; then  # cut short: tables from the rows
            $PY - "$WORK/e2e" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
from bench import common, e2e
out = sys.argv[1]
rows = e2e.fill_not_run(json.load(open(f"{out}/results.json")), "the session's time box for e2e was spent")
common.write_outputs(rows, out, "End-to-end training-step benchmark (cut short by its time box)", [(e2e.markdown, e2e.plot)])
PY
            pack
        fi ;;
    profile)
        stage profile-default "${S_PROFILE:-40}" bash -c "$PY -m bench.profile_step $SMOKE_FLAG --json '$WORK/profile/default.json' \
            2>&1 | tee '$WORK/profile/default.txt'; exit \${PIPESTATUS[0]}"
        stage profile-nanogpt "${S_PROFILE:-40}" bash -c "$PY -m bench.profile_step $SMOKE_FLAG --peer --json '$WORK/profile/nanogpt.json' \
            2>&1 | tee '$WORK/profile/nanogpt.txt'; exit \${PIPESTATUS[0]}" ;;
    ops)
        include=""
        [ -s "$WORK/e2e/results.json" ] && include="--include $WORK/e2e/results.json"
        stage ops "${S_OPS:-140}" $PY -m bench.run_all $SMOKE_FLAG --only attention,cross_entropy,layer_norm,gelu $include \
            --budget-s "${B_OPS:-110}" --out "$WORK/ops" ;;
    curves)
        stage curves "${S_CURVES:-260}" $PY -m bench.curves $SMOKE_FLAG --runs "${CURVES_RUNS:-compiled,eager,compiled-graphs-ln}" \
            --deepspeed-config "${CURVES_CONFIG:-ds_configs/zero0_autocast_bf16.json}" \
            --out "$WORK/curves" --budget-s "$(( ${S_CURVES:-260} - 20 ))" ;;
    probe)
        # gpt1.train itself with CUDA graphs + the fused LayerNorm (bench.curves' compiled-graphs-ln, which had not
        # finished 200 steps in 218 s on the H200 at d74f03d while e2e's fixed-batch step built and ran in 21 s):
        # PROBE_STEPS steps logged one by one, torch's recompile and CUDA-graph logs on, and every thread's Python
        # stack dumped each PROBE_DUMP_S seconds, so that a stall shows where it waits
        mkdir -p "$WORK/probe"
        stage probe "${S_PROBE:-100}" env TORCH_LOGS=recompiles,cudagraphs,perf_hints bash -c "$PY -c '
import faulthandler, runpy, sys
faulthandler.dump_traceback_later(int(sys.argv[1]), repeat=True)
sys.argv = [\"gpt1.train\"] + sys.argv[2:]
runpy.run_module(\"gpt1.train\", run_name=\"__main__\")' ${PROBE_DUMP_S:-30} --data ${PROBE_DATA:-data/shakespeare} \
            --model ${PROBE_MODEL:-gpt1} --out '$WORK/probe/run' --deepspeed-config ds_configs/zero0_autocast_bf16.json \
            --max-steps ${PROBE_STEPS:-60} --micro-batch-size ${PROBE_MICRO:-32} --log-interval 1 --eval-interval 100000 \
            --eval-batches 2 --save-interval 100000 --compile-mode reduce-overhead --norm-impl triton \
            ${PROBE_FLAGS:-} > '$WORK/probe/train.log' 2>&1; rc=\$?; tail -c 3000 '$WORK/probe/train.log'; exit \$rc"
        cp "$WORK/probe/run/metrics.jsonl" "$WORK/probe/" 2>/dev/null
        rm -rf "$WORK/probe/run"
        pack ;;
    tune)
        stage tune "${S_TUNE:-120}" $PY -m bench.tune_attention $SMOKE_FLAG --out "$WORK/tune" \
            --budget-s "$(( ${S_TUNE:-120} - 20 ))" ;;
    tune_ce)
        stage tune_ce "${S_TUNE_CE:-75}" $PY -m bench.tune_cross_entropy $SMOKE_FLAG --out "$WORK/tune_ce" \
            --budget-s "$(( ${S_TUNE_CE:-75} - 15 ))"
        if [ -z "$SMOKE_FLAG" ] && $PY -c 'import json, sys; sys.exit(not json.load(open(sys.argv[1]))["entries"])' \
                "$WORK/tune_ce/cross_entropy_tuned.json" 2>/dev/null; then
            cp "$WORK/tune_ce/cross_entropy_tuned.json" kernels/cross_entropy_tuned.json
            say "tune_ce: kernels/cross_entropy_tuned.json now holds the measured launch for the stages after it"
        fi ;;
    ncu)
        # Nsight Compute on the first launch of each of our kernels at GPT-1's shapes (--smoke: the workload only)
        stage ncu "${S_NCU:-90}" $PY -m bench.ncu $SMOKE_FLAG --out "$WORK/ncu" ;;
    *)
        say "unknown stage $s (roofline host tests e2e ops profile curves probe tune tune_ce ncu)" ;;
    esac
done
pack
say "done; $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/summary.md"
