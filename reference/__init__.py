"""Native Sparse Attention, the readable PyTorch reference (spec: ``shared/nsa-spec.md``).

Every function here is the test oracle for ``optimized`` (same names, same positional arguments).
"""

from .cache import NSACache, decode_attention
from .compressed import compressed_attention
from .compression import LinearCompression, MeanCompression, MLPCompression, compress, make_compression, mean_pool
from .config import NSAConfig
from .decode import decode_tokens_read
from .layer import NativeSparseAttention, NSALayerAux
from .nsa import NSAOutput, combine_gates, nsa_attention
from .rope import apply_rope
from .selected import selected_attention
from .selection import overlap_weights, select_blocks, selection_scores
from .window import sliding_window_attention

__all__ = [
    "LinearCompression",
    "MLPCompression",
    "MeanCompression",
    "NSACache",
    "NSAConfig",
    "NSALayerAux",
    "NSAOutput",
    "NativeSparseAttention",
    "apply_rope",
    "combine_gates",
    "compress",
    "compressed_attention",
    "decode_attention",
    "decode_tokens_read",
    "make_compression",
    "mean_pool",
    "nsa_attention",
    "overlap_weights",
    "select_blocks",
    "selected_attention",
    "selection_scores",
    "sliding_window_attention",
]
