"""Native Sparse Attention in Triton: the same public API as ``reference`` (spec section 11), fast kernels.

``optimized`` may import ``reference`` (its config, argument checks and the pure-Python helpers); never
the reverse. Every public function traces whole with ``torch.compile(fullgraph=True)``, forward and backward,
dense or packed (``cu_seqlens``); docs/kernels.md ("torch.compile") says how.
"""

from reference.config import NSAConfig
from reference.decode import decode_tokens_read

from .compressed import compressed_attention
from .compression import mean_pool
from .decode import DecodeCache, decode_attention
from .nsa import combine_gates, nsa_attention
from .selected import selected_attention
from .selection import select_blocks
from .window import sliding_window_attention

__all__ = [
    "DecodeCache",
    "NSAConfig",
    "combine_gates",
    "compressed_attention",
    "decode_attention",
    "decode_tokens_read",
    "mean_pool",
    "nsa_attention",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
]
