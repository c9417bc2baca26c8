"""Benchmarks: NSA kernels against full attention (FlashAttention-2, cuDNN, FlexAttention) on the GPU."""
