#!/usr/bin/env bash
# hf_kd on one GPU (H100/H200), one run of at most 8 minutes: bf16 step time and peak memory of hf_kd's default
# (chunked) and fused loss paths against TRL's GKD loss and Liger-Kernel's fused linear JSD at vocabularies of
# 128k and 256k, the training step against TRL's GKDTrainer, the loss's scaling in V, and hf-kd cache-teacher
# throughput. Every number comes from benchmarks/run.py and benchmarks/loss_scaling.py (see benchmarks/README.md).
#
#   bash benchmarks/gpu.sh --download-wheels  # where pip reaches PyPI: .whl/ (datasets, trl, liger-kernel ...)
#   bash benchmarks/gpu.sh                    # on the GPU machine: installs .whl/ offline, then measures
#   bash benchmarks/gpu.sh --smoke            # tiny sizes on CPU: checks that every part runs (no results)
#
# Results: $OUT/gpu_summary.md, $OUT/gpu_*.json, $OUT/gpu_loss_scaling.png and $OUT/gpu.log; without OUT, in
# benchmarks/results/ (--smoke: a temporary folder). A part that fails or runs out of its time is named in the
# summary; the others still run.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
# What the GPU image lacks (hf_kd needs datasets; the baselines need trl and liger-kernel), pinned to the versions
# this repository was tested with, carried as wheels: the GPU machine has no network.
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 liger-kernel==0.8.5)
SITE=/tmp/hf_kd_site
BUDGET_S=450 # what the parts share; the rest of the 8 minutes is the wheels, start-up and margin
# Multiplies every time limit: for --smoke on a slow or busy machine (e.g. GPU_SH_TIME_SCALE=4).
TIME_SCALE=${GPU_SH_TIME_SCALE:-1}

download_wheels() {
    local platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
    # WHEEL_PYTHON: the Python of the machine that installs them (the GPU image's is 3.12).
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
        --implementation cp "${platforms[@]}" -d "$ROOT/.whl" "${WHEELS[@]}"
}

# Install .whl/ (offline) and check what can run; exit 2 when hf_kd itself cannot.
prepare() {
    if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
        echo "installing the wheels of .whl/ (offline) into $SITE"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$ROOT"/.whl/*.whl || echo "gpu.sh: installing .whl/ failed; going on with what this Python has"
        export PYTHONPATH="$SITE:$ROOT"
    else
        echo "gpu.sh: no .whl/ folder, nothing installed (bash benchmarks/gpu.sh --download-wheels makes one)"
        export PYTHONPATH="$ROOT"
    fi
    if ! "$PYTHON" -c "import hf_kd" 2>/dev/null; then
        "$PYTHON" -c "import hf_kd" 2>&1 | tail -1
        echo "gpu.sh: hf_kd cannot be imported (above): carry what is missing as wheels (--download-wheels)"
        return 2
    fi
    local entry module name arm
    for entry in trl:TRL:trl_gkd liger_kernel:Liger-Kernel:liger_fused_jsd; do
        IFS=: read -r module name arm <<<"$entry"
        "$PYTHON" -c "import $module" 2>/dev/null ||
            echo "gpu.sh: $name is not installed: its arms ($arm) are SKIPPED; carry .whl/ (--download-wheels)"
    done
    if ((!SMOKE)) && ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu.sh: torch sees no CUDA device here; --smoke checks the script on CPU"
        return 2
    fi
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
}

# part NAME SECONDS COMMAND...: COMMAND with at most SECONDS (and what is left of BUDGET_S); STATUS says how it ended.
part() {
    local name=$1 seconds=$(($2 * TIME_SCALE))
    shift 2
    local left=$((BUDGET_S * TIME_SCALE - (SECONDS - STARTED)))
    ((seconds > left)) && seconds=$left
    if ((seconds < 10)); then
        STATUS+=("| $name | not run: the ${BUDGET_S} s budget was spent |")
        return
    fi
    echo "== $name (at most ${seconds} s): $*"
    local start=$SECONDS rc
    timeout --kill-after=10 "$seconds" "$@"
    rc=$?
    if ((rc == 0)); then
        STATUS+=("| $name | done in $((SECONDS - start)) s |")
    elif ((rc == 124 || rc == 137)); then
        STATUS+=("| $name | stopped after ${seconds} s, its time: no results |")
    else
        STATUS+=("| $name | failed (exit status $rc) after $((SECONDS - start)) s: see gpu.log |")
    fi
}

run_parts() {
    cd "$ROOT" || return 2
    local run_py=("$PYTHON" benchmarks/run.py --device "$DEVICE" "${SIZE[@]}" --out "$WORK") vocab
    part "loss alone, cache-teacher" 180 "${run_py[@]}" --only loss,cache --vocabs "$VOCABS" --loss-steps 5 \
        --variants naive_from_hidden,chunked_from_hidden,fused,trl_gkd_loss,liger_fused_jsd --name gpu_loss_cache
    for vocab in "${STEP_VOCABS[@]}"; do
        part "training step, V $vocab" 90 "${run_py[@]}" --only steps --step-vocab "$vocab" --steps 10 \
            --variants ce_only,teacher_forward,hf_kd,hf_kd_fused,hf_kd_kl_only,hf_kd_kl_only_fused,trl_gkd \
            --name "gpu_steps_v$vocab"
    done
    part "loss scaling in V" 90 "$PYTHON" benchmarks/loss_scaling.py --device "$DEVICE" --vocabs "$VOCABS" \
        --tokens "$TOKENS" --max-gib "$MAX_GIB" --steps 3 --out "$WORK"
    local f
    for f in "$WORK"/loss_scaling_*; do [[ -e $f ]] && mv "$f" "$WORK/gpu_loss_scaling.${f##*.}"; done
}

write_results() {
    local gpu f
    gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
    {
        echo "# hf_kd on one GPU: benchmarks/gpu.sh"
        echo
        echo "$(date -u '+%Y-%m-%d %H:%M UTC'); ${gpu:-no GPU}; $((SECONDS - STARTED)) s in all"
        echo
        echo "| part | how it ended |"
        echo "|---|---|"
        printf '%s\n' "${STATUS[@]}"
        for f in "$WORK"/gpu_loss_cache.md "$WORK"/gpu_steps_v*.md "$WORK"/gpu_loss_scaling.md; do
            [[ -e $f ]] && echo && sed 's/^#/##/' "$f"
        done
    } >"$DEST/gpu_summary.md"
    for f in "$WORK"/gpu_*.json "$WORK"/gpu_loss_scaling.png; do [[ -e $f ]] && cp "$f" "$DEST"/; done
    echo "== wrote $DEST/gpu_summary.md, gpu.log and the JSON files:"
    ls "$DEST"
    cat "$DEST/gpu_summary.md"
}

main() {
    STARTED=$SECONDS
    STATUS=()
    prepare || return
    run_parts
    write_results
}

if [[ ${1:-} == --download-wheels ]]; then
    download_wheels
    exit
fi
SMOKE=0
[[ ${1:-} == --smoke ]] && SMOKE=1
if ((SMOKE)); then
    DEST=${OUT:-$(mktemp -d /tmp/hf_kd_gpu_smoke.XXXXXX)}
    DEVICE=cpu VOCABS=500,700 TOKENS=64,128 MAX_GIB=1 STEP_VOCABS=(600 900) SIZE=(--smoke)
else
    DEST=${OUT:-$ROOT/benchmarks/results}
    DEVICE=cuda VOCABS=128000,256000 TOKENS=4096,16384 MAX_GIB=60 STEP_VOCABS=(128000 256000) SIZE=()
fi
mkdir -p "$DEST"
WORK=$(mktemp -d /tmp/hf_kd_gpu.XXXXXX)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
main 2>&1 | tee "$DEST/gpu.log"
exit "${PIPESTATUS[0]}"
