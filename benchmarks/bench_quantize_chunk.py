"""Quantization error against bytes for several chunk sizes, on the main job's real gradients.

    python benchmarks/bench_quantize_chunk.py --data ../shared/data/tinyshakespeare.txt \
        --json benchmarks/results/quantize_chunk.json

Trains the CharLM (one process, AdamW) and, at the given steps, quantizes every layer the hook
would quantize (here: at least 1024 entries) with the reference codec, round to nearest. Prints the
relative error ``||g - decode(encode(g))|| / ||g||`` over all those layers and how many times fewer
bytes than float32 their messages take, for every bit width and chunk size. This is how the hook's
default ``chunk`` was chosen.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from gcomp.compress.quantize import quantize_pack, quantize_unpack_add_
from gcomp.examples.charlm import Batches, CharLM, CharLMConfig, default_corpus_path, language_model_loss, load_corpus


def measure(gradients: list[torch.Tensor], bits: int, chunk: int) -> tuple[float, float]:
    """(relative error over all layers, float32 bytes / message bytes)."""
    error = total = 0.0
    message_bytes = dense_bytes = 0
    for gradient in gradients:
        message = quantize_pack(gradient, [0], [gradient.numel()], bits, chunk)
        decoded = torch.zeros_like(gradient)
        quantize_unpack_add_(decoded, message, [0], [gradient.numel()], bits, chunk)
        error += float((gradient - decoded).pow(2).sum())
        total += float(gradient.pow(2).sum())
        message_bytes += message.numel()
        dense_bytes += 4 * gradient.numel()
    return (error / total) ** 0.5, dense_bytes / message_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=default_corpus_path())
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 30], help="training steps at which gradients are measured")
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 256, 512, 1024, 4096])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = CharLMConfig.preset(args.model)
    model = CharLM(config)
    batches = Batches(load_corpus(args.data), config.context, 16, 0, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    records = []
    for step in range(max(args.steps) + 1):
        inputs, targets = batches.next()
        optimizer.zero_grad()
        language_model_loss(model, inputs, targets).backward()
        if step in args.steps:
            gradients = [p.grad.detach().reshape(-1).clone() for p in model.parameters() if p.numel() >= 1024]
            for bits in (1, 2, 4, 8):
                for chunk in args.chunks:
                    error, ratio = measure(gradients, bits, chunk)
                    records.append({"step": step, "bits": bits, "chunk": chunk, "relative_error": error, "fewer_bytes": ratio})
                    print(f"step {step:3d}  bits {bits}  chunk {chunk:5d}  relative error {error:.4f}  {ratio:.2f}x fewer bytes")
        optimizer.step()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"arguments": vars(args), "records": records}, handle, indent=2)


if __name__ == "__main__":
    main()
