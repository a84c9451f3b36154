"""Compression math: pure tensor code, no torch.distributed (low-rank, top-k, message packing)."""
