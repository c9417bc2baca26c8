"""Native Sparse Attention, the readable PyTorch reference (spec: ``shared/nsa-spec.md``).

Every function here is the test oracle for ``optimized`` (same names, same positional arguments).
"""

from .compressed import compressed_attention
from .config import NSAConfig
from .decode import decode_tokens_read
from .nsa import NSAOutput, combine_gates, nsa_attention
from .selected import selected_attention
from .selection import overlap_weights, select_blocks, selection_scores
from .window import sliding_window_attention

__all__ = [
    "NSAConfig",
    "NSAOutput",
    "combine_gates",
    "compressed_attention",
    "decode_tokens_read",
    "nsa_attention",
    "overlap_weights",
    "select_blocks",
    "selected_attention",
    "selection_scores",
    "sliding_window_attention",
]
