#!/usr/bin/env bash
# One GPU session of a reference experiment (issue 17: experiments/gpu-paper-layout.json, then -s1.json),
# as chained device calls on one warm machine; the workdir lives on the device's disk and is lost when the
# machine goes back, so the calls must follow each other at once:
#
#   bash experiments/device-session.sh pretrain experiments/gpu-paper-layout.json   # base model + calibration (~560 s)
#   bash experiments/device-session.sh all experiments/gpu-paper-layout.json        # search, eval, report (repeat
#                                                                                   # until it no longer says partial)
#   bash experiments/device-session.sh conv experiments/gpu-paper-layout-s1.json    # with the time left: search
#                                      # convergence on the same base (CONV_ARGS: search_convergence.py options)
# (carry .exp/corpus up with the call). Every call packs what it made, less model weights, into
# $OUT/<config>-<stage>-<time>.tgz (gates kept, model and optimizer weights not): the device returns at most
# 8 files, so the many small ones travel as one.
# WORK (default /tmp/W) and BUDGET (seconds for `all` and `conv`, default 500) may be set.
set -euo pipefail
stage=${1:?usage: device-session.sh pretrain|all|conv CONFIG}
cfg=${2:?usage: device-session.sh pretrain|all|conv CONFIG}
work=${WORK:-/tmp/W}
out=${OUT:-out}
name=$(basename "$cfg" .json)
export PYTHONPATH=src
quiet() { grep -v -E "it/s|cell/s|batch/s|s/it" || true; }

rc=0
set +e  # pack whatever was made, also after a partial (exit 3) or failed stage; exit with its status
case "$stage" in
  pretrain)
    python3 -m consa experiment pretrain --config "$cfg" --workdir "$work" 2>&1 | quiet | tail -6
    rc=${PIPESTATUS[0]}
    window=$(python3 -c "import json, sys; sys.path.insert(0, 'src'); from consa.experiment import ExperimentConfig; print(ExperimentConfig.load('$cfg').W)")
    length=$(python3 -c "import json; c = json.load(open('$cfg')); print(max(c['eval']['lengths']))")
    python3 -m consa eval --model "$work/base/checkpoint" --window "$window" --corpus .exp/corpus --ppl-sequences 8 \
        --ppl-length "$length" --tasks passkey,multikey,varrecall --lengths "$length" --depths 0.1,0.5,0.9 --items 6 \
        --digits 3 --device cuda --bf16 --batch-size 18 --out "$work/calibration" 2>&1 | quiet | tail -12
    erc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] && rc=$erc
    ;;
  all)
    python3 -m consa experiment all --config "$cfg" --workdir "$work" --time-budget "${BUDGET:-500}" 2>&1 | quiet | tail -40
    rc=${PIPESTATUS[0]}
    ;;
  conv)  # search convergence on the workdir's base model: benchmarks/search_convergence.py (issue 17). By default
        # today's default with the cut refinement in three orders (its unrefined cut is the plain default's) and v0, Duo-style
        # beside, 150 steps first so that the budget cuts the 300-step runs, not the comparison at 150
    mkdir -p "$work/conv"
    # shellcheck disable=SC2086  # CONV_ARGS is a list of options
    python3 benchmarks/search_convergence.py --config "$cfg" --workdir "$work" \
        ${CONV_ARGS:---sparsity 0.875 --seeds 0 --steps 150,300 --variants refine,refine_measured,refine_gradient,v0} \
        --budget-s "${BUDGET:-500}" --out "$work/conv/conv-$(date +%H%M%S).json" 2>&1 | quiet | tail -30
    rc=${PIPESTATUS[0]}
    ;;
  *)
    echo "device-session.sh: unknown stage '$stage' (pretrain, all or conv)" >&2
    exit 2
    ;;
esac
mkdir -p "$out"
pack="$out/$name-$stage-$(date +%H%M%S).tgz"
(cd "$work" && find . -type f -size -4M ! -name 'model*.safetensors' ! -name 'optimizer.safetensors' \
    ! -name 'bank.npz' ! -path './corpus/*' \
    ! -path './.consa-cache/*' -print0 | tar czf - --null -T -) > "$pack"
ls -la "$pack"
exit "$rc"
