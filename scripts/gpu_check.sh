#!/usr/bin/env bash
# The one device check of the performance issue: every size, ours vs PyTorch, on one H100/H200.
#
#   bash scripts/gpu_check.sh                     # from the repository root, on the GPU machine
#   (first, here: bash scripts/fetch_device_wheels.sh → .whl/, then carry .whl with the device call)
#   bash scripts/gpu_check.sh base-10s-b128 ...   # only the runs with these labels (see the list below)
#
# Writes $OUT/bench.jsonl (one JSON object per benchmark run, or {"label", "error"} for one that failed or
# was skipped; a label's last row is its result) and $OUT/log.txt (everything printed), and ends with a
# Markdown table of the runs.
# Resumable: runs that succeeded are recorded in $STATE_DIR (default /tmp/gpu_check_state, which lives as long
# as the machine), and a second call on the same machine skips them and the parity check (whose verdict, cudnn
# or xla, is kept there too; delete the folder to check again), so one device session can be spent as two
# back-to-back calls: `BUDGET_S=570 bash scripts/gpu_check.sh` (parity, probe and unpadded parity + runs 1-2 by the
# estimates below: 75 + 260 + 230 = 565 s; GPU run 5's first call did parity and seven runs in 533 s), then again
# with what the session has left (BUDGET_S ≈ 290 s: runs 3-5, 170 + 50 + 50 s; run 5's second call had 290 s).
# The rows of every call since the state was fresh are kept there as well, so each call's bench.jsonl and summary
# hold all of them (a device call may get a new, empty $OUT each time).
# Order = importance, so that a call cut short still leaves the most useful figures:
#   1. versions, nvidia-smi; cuDNN vs XLA attention parity through our `layers.Attention` (values and
#      gradients, bf16, the padded Whisper and causal CLIP shapes; scripts/attention_parity.py) — chooses the
#      attention implementation for the rest (cudnn unless it fails); then, in a call of its own that cannot
#      change that, whether cuDNN trains Whisper's odd length unpadded and unmasked, and how fast
#      (`attention_parity.py --unpadded-probe`, small's shape), and whether `Attention`'s cudnn_unpadded form
#      agrees with XLA on the same cases (its run below is made only if it does, with an odd length unpadded)
#   2. the verdicts no run has given: large b16 and medium b32 against torch.compile of the whole step, in one
#      process (runs 3 and 4 compared them with the regional compile or the issue's table only)
#   3. small b64, the target still open, against torch.compile with our step in its default form (run 5 measured
#      the ratio without XLA's command buffers; profiled, HLO dumped, trace kept); then with Whisper's odd length
#      unpadded for cuDNN where jax trains it so (`--attention cudnn_unpadded`, if that form agreed with XLA); then
#      without Triton GEMMs, which run 5 found 2% faster for small without command buffers
#   4. base 10 s b128 (its 2.5× target needs the command buffers: run 5, without them, 2.10×); base 30 s b128
#      against torch.compile and eager PyTorch; large b64 without remat; large b16 against the regional compile
#      (our steps from the JAX compile cache)
# Every run is bounded by what is left of BUDGET_S (default 510 s from the start of this script) and by
# RUN_LIMIT_PERCENT (default 150) of its estimate, so that one run that hangs cannot take the call; a run that
# would not fit its estimate is skipped and recorded as such (the next call on the machine runs it), and so is
# one that needs more memory than the card has (large b64 without remat on an H100). A run that ran out of time
# goes last in the next call on the machine, after the runs that have not had their turn. At its limit a run gets
# TERM, and KILL_AFTER_S (default 10) later KILL.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/log.txt
JSONL=$OUT/bench.jsonl
START=$(date +%s)
BUDGET_S=${BUDGET_S:-510}
RUN_LIMIT_PERCENT=${RUN_LIMIT_PERCENT:-150}
KILL_AFTER_S=${KILL_AFTER_S:-10}
STATE_DIR=${STATE_DIR:-/tmp/gpu_check_state}
mkdir -p "$STATE_DIR"
touch "$STATE_DIR/done.txt" "$STATE_DIR/out_of_time.txt"
EARLIER_OUT_OF_TIME=$(cat "$STATE_DIR/out_of_time.txt")  # runs last in this call (the `retry` pass below)
RECORD=$STATE_DIR/bench.jsonl  # every call's rows; emptied only on a fresh start (no run done yet)
[ -s "$STATE_DIR/done.txt" ] || : >"$RECORD"
cp "$RECORD" "$JSONL"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# A run that fails on the device keeps its whole traceback in log.txt: there is no second try to ask for it.
export WAVLINK_JAX_TRACEBACK=1
# Same compiled step again (the eager-baseline run re-times base) → cache hit instead of a second compile.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache

log() { echo "$*" | tee -a "$LOG"; }
logged() { grep --line-buffered -v -E 'UserWarning|warnings.warn' | tee -a "$LOG"; }  # a command's output, less noise
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# --- carried wheels: the versions our tests ran with, where the machine's differ or are missing ---------------
# (optax / ml_collections as pinned in requirements.txt — not flax: the machine's own matches its jax; grain,
# soundfile, soxr and their needs because importing configs/common.py imports the data pipeline). /tmp/site comes
# first on the path before the versions are compared, so a second call on the machine installs nothing again.
if ls .whl/*.whl >/dev/null 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    NEEDED=$(python3 - <<'EOF'
import glob, os
from importlib import metadata
for wheel in sorted(glob.glob(".whl/*.whl")):
    name, version = os.path.basename(wheel).split("-")[:2]
    try:
        have = metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        have = None
    if have != version:
        print(wheel)
EOF
)
    if [ -n "$NEEDED" ]; then
        log "installing carried wheels into /tmp/site: $NEEDED"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            $NEEDED 2>&1 | tee -a "$LOG"
    fi
fi
# Every run imports configs/common.py, which imports the data pipeline and its whole stack: try it once here.
if ! IMPORT_ERROR=$(python3 -c "import configs.common" 2>&1); then
    log "error: python3 cannot import configs/common.py ($(tail -n 1 <<<"$IMPORT_ERROR")). On a machine with pip" \
        "run \`bash scripts/fetch_device_wheels.sh\` and carry .whl with the device call."
    exit 1
fi

# --- the machine ---------------------------------------------------------------------------------------------
{
    date -u
    nvidia-smi
    python3 -c "import sys; print('python', sys.version.split()[0])"
    python3 -m pip list 2>/dev/null | grep -i -E '^(jax|jaxlib|jax-cuda13-plugin|jax-cuda13-pjrt|flax|optax|orbax-checkpoint|torch|transformers|triton|nvidia-cudnn-cu13|nvidia-cublas|numpy)[[:space:]]'
    python3 -c "from importlib import metadata as m; print('as imported here (carried wheels first):', {p: m.version(p) for p in ('jax', 'flax', 'optax', 'ml-collections', 'grain', 'torch', 'transformers')})"
} 2>&1 | tee -a "$LOG"

# --- cuDNN vs XLA attention through our layers.Attention (what the benchmark runs), values and gradients ---
# Whisper 30 s (1501 positions, padded to 1504 inside Attention) and CLIP text (77 → 80, causal, short captions).
if [ -f "$STATE_DIR/attention" ]; then
    ATTENTION=$(cat "$STATE_DIR/attention")
    log "attention implementation from this machine's earlier call: $ATTENTION"
else
    ATTENTION=cudnn
    timeout 150 python3 scripts/attention_parity.py --batch 2 \
        --cases whisper-base-30s clip-text-b32-causal-padded 2>&1 | logged
    if [ "${PIPESTATUS[0]}" -ne 0 ]; then  # the check's own status (grep's says only whether it passed lines)
        ATTENTION=xla
        log "cuDNN attention failed or disagreed: the benchmark runs use --attention xla"
    fi
    echo "$ATTENTION" >"$STATE_DIR/attention"
    if [ "$ATTENTION" = cudnn ]; then  # a question in a call of its own: whatever it does, the verdict stands
        rm -f "$STATE_DIR/unpadded_agrees"  # this check's answer, never an earlier one's
        # the probe's answer, then Attention's cudnn_unpadded form against XLA: its run below only if that agrees
        # and a case ran unpadded (the check's case lines say ", unpadded)"); where this jax pads every odd length,
        # the form is cudnn's own program, which small-30s-b64-vs-compile measures already
        timeout 150 python3 scripts/attention_parity.py --unpadded-probe 64 --batch 2 \
            --cases whisper-base-30s clip-text-b32-causal-padded 2>&1 | logged | tee "$STATE_DIR/unpadded_check.txt"
        PROBE_STATUS=${PIPESTATUS[0]}
        if [ "$PROBE_STATUS" -ne 0 ]; then
            log "unpadded probe: no answer, or the cudnn_unpadded form disagreed (status $PROBE_STATUS);" \
                "its run is left out, the others go on with cudnn"
        elif ! grep -q ', unpadded): ' "$STATE_DIR/unpadded_check.txt"; then
            log "unpadded probe: this jax pads every odd length for cuDNN, so cudnn_unpadded is cudnn;" \
                "its run is left out"
        else
            touch "$STATE_DIR/unpadded_agrees"
        fi
    fi
fi

# torch and JAX shared one process on the first H200 run (torch 2.11 + jax 0.11.2); SEPARATE_BASELINE=1 runs
# each PyTorch baseline in a child process instead, for an image where they cannot.
SEPARATE=""
[ "${SEPARATE_BASELINE:-0}" = 1 ] && SEPARATE=--separate-baseline

# --- benchmark runs ------------------------------------------------------------------------------------------
SELECTED=" $* "
# The card's memory in GiB (run 3's H200: 140; an H100: 79), for runs that need more than an H100 has.
CARD_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
[[ "$CARD_MIB" =~ ^[0-9]+$ ]] && CARD_GIB=$((CARD_MIB / 1024)) || CARD_GIB=""  # "": unknown, every run is tried
skip() {  # skip LABEL WHY: recorded as the label's row, so the summary says why it has no figures
    log "== $1: skipped ($2)"
    echo "{\"label\": \"$1\", \"error\": \"skipped: $2\"}" >>"$RECORD"
    cp "$RECORD" "$JSONL"
}
bench() {  # bench LABEL MIN_SECONDS [MIN_CARD_GIB] ARGS...   (only the labels given on the command line, if any)
    local label=$1 need=$2 memory=0
    shift 2
    [[ "${1:-}" =~ ^[0-9]+$ ]] && memory=$1 && shift
    if [ -n "${SELECTED// /}" ] && [[ "$SELECTED" != *" $label "* ]]; then
        return
    fi
    local pass=first  # the pass in which this run takes its turn: `retry` if it ran out of time in an earlier call
    grep -qxF "$label" <<<"$EARLIER_OUT_OF_TIME" && pass=retry
    [ "$pass" = "$PASS" ] || return
    if grep -qxF "$label" "$STATE_DIR/done.txt"; then
        log "== $label: done in an earlier call on this machine"
        return
    fi
    if [ -n "$CARD_GIB" ] && [ "$CARD_GIB" -lt "$memory" ]; then
        skip "$label" "needs a card of ${memory} GiB or more, this one has ${CARD_GIB} GiB"
        return
    fi
    local remaining limit
    remaining=$(left)
    if [ "$remaining" -lt "$need" ]; then
        skip "$label" "${remaining} s of the budget left, needs ~${need} s"
        return
    fi
    limit=$((need * RUN_LIMIT_PERCENT / 100))
    [ "$limit" -lt "$remaining" ] || limit=$remaining
    log "== $label: benchmark.py $* (limit $limit s)"
    local t0=$(date +%s)
    local separate=""
    [[ " $* " == *" --baseline "* ]] && separate=$SEPARATE
    timeout --kill-after="$KILL_AFTER_S" "$limit" python3 scripts/benchmark.py --attention "$ATTENTION" \
        --label "$label" --jsonl "$RECORD" $separate "$@" 2>&1 | logged
    local rc=${PIPESTATUS[0]} took=$(($(date +%s) - t0))
    log "== $label: exit $rc after $took s"
    if [ "$rc" -ne 0 ]; then
        local why="exit $rc"
        # 124: stopped by timeout's TERM; 137 at the limit: KILLed by timeout after ignoring it. A KILL before the
        # limit came from elsewhere (the kernel's OOM killer: host memory), which another call would meet again.
        if [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ "$took" -ge "$limit" ]; }; then
            why="out of time (limit $limit s)"
            echo "$label" >>"$STATE_DIR/out_of_time.txt"
        elif [ "$rc" -eq 137 ]; then
            why="killed (status 137) before its limit of $limit s: out of host memory?"
        fi
        echo "{\"label\": \"$label\", \"error\": \"$why after $took s\"}" >>"$RECORD"
    else
        echo "$label" >>"$STATE_DIR/done.txt"
    fi
    cp "$RECORD" "$JSONL"
}

# Estimated seconds (GPU runs 4 and 5's timings plus 5–10%; the full compile of large and medium by small's, 54–70 s
# for its 24 blocks, scaled to their 44 and 36) are the skip thresholds, and RUN_LIMIT_PERCENT of them each run's
# time limit. XLA's defaults everywhere (command buffers and Triton GEMMs on: GPU run 5), but where a label says.
NO_TRITON_GEMM=(--xla-option xla_gpu_enable_triton_gemm=false)
runs() {
    bench large-30s-b16-vs-compile 260 --model large --batch 16 --window 30 --baseline torch --compile --steps 5
    bench medium-30s-b32-vs-compile 230 --model medium --batch 32 --window 30 --baseline torch --compile --steps 5
    bench small-30s-b64-vs-compile 170 --model small --batch 64 --window 30 --baseline torch --compile --steps 10 \
        --profile 1 --dump-hlo "$OUT/hlo_small_30s_b64.txt" --save-trace "$OUT/trace_small_30s_b64.json.gz"
    [ -f "$OUT/hlo_small_30s_b64.txt" ] && gzip -f "$OUT/hlo_small_30s_b64.txt"
    # Whisper's odd 1501 positions to cuDNN as they are, where this jax trains them so (the row says which tower's
    # were): no padding mode, whose buffer zeroing costs small ~1.5 ms a step. Only where that form agreed with XLA
    # and gave cuDNN an odd length as it is.
    [ -f "$STATE_DIR/unpadded_agrees" ] && bench small-30s-b64-cudnn-unpadded 50 --model small --batch 64 --window 30 \
        --steps 10 --attention cudnn_unpadded
    bench small-30s-b64-no-triton-gemm 50 --model small --batch 64 --window 30 --steps 10 "${NO_TRITON_GEMM[@]}"
    bench base-10s-b128 55 --model base --batch 128 --window 10 --steps 10
    bench base-30s-b128-vs-compile 150 --model base --batch 128 --window 30 --baseline torch --compile --steps 10
    bench base-30s-b128-vs-eager 40 --model base --batch 128 --window 30 --baseline torch --steps 10
    # Large b64's program took 129.8 GiB of the card in GPU run 4, more than the 126.4 GiB (90%) that benchmark.py gives
    # JAX: so 95% (133.4 GiB).
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 bench large-30s-b64 100 130 --model large --batch 64 --window 30 --steps 3 \
        --warmup 1
    bench large-30s-b16-vs-compile-regional 65 --model large --batch 16 --window 30 --baseline torch --compile regional \
        --steps 5
}
PASS=first runs
PASS=retry runs  # the runs that ran out of time in an earlier call on this machine

# --- summary -------------------------------------------------------------------------------------------------
python3 - "$JSONL" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
sys.path.insert(0, "scripts")
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
rows = list({row["label"]: row for row in rows}.values())  # a label's last row (a rerun after a failure or skip)
print(f"\n{len(rows)} runs on {next((r['device'] for r in rows if 'device' in r), '?')}, "
      f"matmul peak {next((round(r['matmul_peak_tflops']) for r in rows if 'device' in r), '?')} TFLOP/s")
print("| run | samples/s | ms/step | model TFLOP/s (% peak) | XLA TFLOP/s | peak GiB (program) | init s | compile s | "
      "torch samples/s (TFLOP/s) | torch GiB | ours/torch samples/s | ours/torch at equal work (each side's own FLOP count / time) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
regional = False
for r in rows:
    if "error" in r:
        print(f"| {r['label']} | {r['error']} |||||||||||")
        continue
    b = r["baseline"]
    gib = lambda x: "n/a" if x is None else f"{x / 2**30:.1f}"
    xla = "n/a" if r["tflops_cost_analysis"] is None else f"{r['tflops_cost_analysis']:.0f}"
    if b is not None and "error" in b:
        torch, b = f"failed: {b['error'][:80]}", None
    else:
        torch = "" if b is None else f"{b['samples_per_s']:.1f} ({b['tflops_model']:.0f}) {'compile ' + b['compile'] if b['compile'] else 'eager'}"
    # vs a baseline compiled per block, which gives up fusions across blocks: not the issue's torch.compile
    against = "" if b is None or b["compile"] != "regional" else " vs regional compile*"
    regional = regional or bool(against)
    ratios = "| | |" if b is None else f"| {r['ratio']:.2f}{against} | {r['ratio_equal_work']:.2f}{against} |"
    print(f"| {r['label']} | {r['samples_per_s']:.1f} | {1e3 * r['step_time_s']:.1f} | {r['tflops_model']:.0f} "
          f"({100 * r['fraction_of_peak_model']:.0f}%) | {xla} | {gib(r['peak_memory_bytes'])} "
          f"({gib(r.get('program_memory', {}).get('program_bytes'))}) | {r['init_s']:.0f} | {r['compile_s']:.0f} | "
          f"{torch} | {'' if b is None else gib(b['peak_memory_bytes'])} {ratios}")
if regional:
    print("\n* against `--compile regional` (each block compiled, the rest eager), a weaker baseline than the issue's "
          "torch.compile of the whole step: not a verdict on its ≥ 1.25× target, which full-compile rows give")
for r in rows:
    profile = r.get("profile")
    if profile and "error" not in profile:
        kinds = ", ".join(f"{kind} {ms:.1f}" for kind, ms in profile["by_kind_ms_per_step"].items())
        print(f"\n{r['label']}: step {1e3 * r['step_time_s']:.1f} ms, device busy {profile['device_busy_ms_per_step']:.1f} ms "
              f"({kinds}); log-mel alone {1e3 * r['log_mel_s']:.1f} ms; lines {profile['lines']}")
        for name, ms, launches in profile["top_kernels_ms_per_step"]:
            print(f"  {ms:8.2f} ms {launches:6.1f}×  {name}")
        from benchmark import idle_table, source_table  # by line of our code, with bytes and TB/s (imports jax: here)
        print("\n".join(idle_table(profile, r["step_time_s"], r["xla_options"]) + source_table(profile)))
    elif profile:
        print(f"\n{r['label']}: profile failed: {profile['error'][:300]}")
EOF
log "total $(($(date +%s) - START)) s"
