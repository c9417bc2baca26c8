"""``python -m benchmarks.run`` from the repository that holds this script (same-card A/B runs of the benchmark).

    python ab_base/scripts/run_bench.py --configs default --branches core --lengths 65536 --skip-baselines

runs ``ab_base``'s benchmark on ``ab_base``'s kernels (``scripts/ab_prepare.sh``), as ``gpu_check.sh ab`` does
with ``AB_CMD="scripts/run_bench.py ..."``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.run import main

if __name__ == "__main__":
    sys.exit(main())
