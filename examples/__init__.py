"""Worked examples: a tiny NSA language model trained to retrieve a needle far outside its window."""
