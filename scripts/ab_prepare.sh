#!/usr/bin/env bash
# Same-card A/B timing: export the code of git revision REV (default HEAD~1) into ab_base/, so that one GPU
# call can time the base and the working tree on the same machine (device timings are only comparable
# within one machine; METHOD.md of the device tool).
#
#   scripts/ab_prepare.sh 9b8a8ce        # then, in the GPU call (carry: ["ab_base"], it is git-ignored):
#   scripts/gpu_check.sh env ab          # AB_CMD (default: the selection at 64k) under both trees
#
# ab_base/ holds optimized/, reference/, benchmarks/ and scripts/ of REV; a command run as
# `python ab_base/scripts/X.py` imports them (the scripts put their own repository root first on sys.path).
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:-HEAD~1}
rm -rf ab_base
mkdir ab_base
git archive "$REV" optimized reference benchmarks scripts | tar -x -C ab_base
# a script that did not exist at REV is taken from the working tree (it must still import REV's kernels)
for f in scripts/*.py; do [[ -e ab_base/$f ]] || cp "$f" "ab_base/$f"; done
echo "ab_base/ = $(git rev-parse --short "$REV") ($(du -sh ab_base | cut -f1)); pass carry=[\"ab_base\"] to the GPU call"
