"""A byte-level language model on real text, runnable offline on CPU.

The corpus defaults to the Python standard library's own source files, which every machine with
Python has; ``--data PATH`` reads any text file (e.g. Tiny Shakespeare) or a directory of them.
Bytes are the vocabulary (256 symbols), so there is nothing to build or download.
"""
from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import dataclass

import torch
from torch import nn


def default_corpus_path() -> str:
    """The standard library's source directory: present on every Python installation."""
    return sysconfig.get_paths()["stdlib"]


def load_corpus(path: str | None = None, max_bytes: int = 4_000_000) -> torch.Tensor:
    """Read up to ``max_bytes`` of text from a file, or from the ``.py`` files under a directory
    (sorted, so every rank reads the same bytes), as a uint8 tensor."""
    path = path or default_corpus_path()
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            data = handle.read(max_bytes)
    elif os.path.isdir(path):
        chunks, total = [], 0
        for root, directories, files in os.walk(path):
            directories.sort()
            directories[:] = [d for d in directories if d not in ("site-packages", "__pycache__", "test", "tests")]
            for name in sorted(files):
                if not name.endswith((".py", ".txt", ".rst")):
                    continue
                with open(os.path.join(root, name), "rb") as handle:
                    chunk = handle.read(max_bytes - total)
                chunks.append(chunk)
                total += len(chunk)
                if total >= max_bytes:
                    break
            if total >= max_bytes:
                break
        data = b"".join(chunks)
    else:
        raise FileNotFoundError(f"no text corpus at {path!r} (give --data a text file or a directory)")
    if len(data) < 10_000:
        raise ValueError(f"corpus at {path!r} has only {len(data)} bytes; need at least 10000")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


@dataclass(frozen=True)
class CharLMConfig:
    context: int = 128
    width: int = 256
    layers: int = 4
    heads: int = 4

    @classmethod
    def preset(cls, name: str) -> "CharLMConfig":
        presets = {
            "tiny": cls(context=64, width=64, layers=2, heads=2),  # tests: ~0.1 M parameters
            "small": cls(context=128, width=256, layers=4, heads=4),  # README job: ~3.3 M
            "medium": cls(context=128, width=384, layers=6, heads=6),  # ~11 M
            # The second workload of the benchmarks: deeper, narrower, shorter context (~1.7 M).
            "deep": cls(context=64, width=128, layers=8, heads=4),
        }
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]


class CharLM(nn.Module):
    """A small decoder-only transformer over bytes."""

    def __init__(self, config: CharLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(256, config.width)
        self.position = nn.Parameter(torch.zeros(config.context, config.width, device="cpu"))  # moved with .to()
        layer = nn.TransformerEncoderLayer(
            config.width, config.heads, dim_feedforward=4 * config.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, 256)
        mask = torch.triu(torch.full((config.context, config.context), -math.inf, device="cpu"), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:length]
        hidden = self.blocks(hidden, mask=self.causal_mask[:length, :length], is_causal=True)
        return self.head(self.norm(hidden))


class CharLSTM(nn.Module):
    """A byte-level recurrent language model: embedding, stacked LSTM, linear head. The
    non-transformer workload of the benchmarks, trained with plain SGD + momentum (the setting
    where error feedback on raw gradients is meant to work without an adaptive optimizer)."""

    def __init__(self, context: int = 64, width: int = 128, hidden: int = 384, layers: int = 2) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(256, width)
        self.recurrent = nn.LSTM(width, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.recurrent(self.embed(tokens))
        return self.head(hidden)


def build_model(name: str) -> tuple[nn.Module, int]:
    """A model preset by name and its context length: the CharLM presets (``tiny``, ``small``,
    ``medium``, ``deep``) or ``lstm`` (CharLSTM, 2 layers of 384, about 2.1 M parameters)."""
    if name == "lstm":
        model = CharLSTM()
        return model, model.context
    try:
        config = CharLMConfig.preset(name)
    except ValueError:
        raise ValueError(f"unknown model {name!r}; choose lstm or a CharLM preset: deep, medium, small, tiny") from None
    return CharLM(config), config.context


class Batches:
    """Random windows of the corpus; each rank draws its own (seeded by seed and rank).

    ``partition=(index, count)`` restricts this rank's training windows to the ``index``-th of
    ``count`` equal contiguous parts of the training text: heterogeneous data per rank (on Tiny
    Shakespeare, different plays and speakers), the setting error-feedback theory distinguishes
    from identically distributed data. Validation windows stay the same on every rank."""

    def __init__(self, corpus: torch.Tensor, context: int, batch_size: int, seed: int, rank: int, validation_fraction: float = 0.1,
                 partition: tuple[int, int] | None = None) -> None:
        split = int(len(corpus) * (1 - validation_fraction))
        self.train, self.validation = corpus[:split].long(), corpus[split:].long()
        if partition is not None:
            index, count = partition
            if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
                raise ValueError(f"partition must be (index, count) with 0 <= index < count; got {partition!r}")
            part = split // count
            if part < context + 2:
                raise ValueError(f"a 1/{count} part of the training text ({part} tokens) is shorter than one window ({context + 1})")
            self.train = self.train[index * part : (index + 1) * part]
        self.context, self.batch_size = context, batch_size
        self.generator = torch.Generator(device="cpu").manual_seed(seed * 1009 + rank)  # host-side sampling

    def _window(self, data: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = starts[:, None] + torch.arange(self.context + 1, device=starts.device)[None, :]
        window = data[index]
        return window[:, :-1], window[:, 1:]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.train) - self.context - 1, (self.batch_size,), generator=self.generator, device="cpu")
        return self._window(self.train, starts)

    def validation_batches(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed set of validation windows (the same on every rank and every call)."""
        span = len(self.validation) - self.context - 1
        starts = torch.linspace(0, span - 1, count * self.batch_size, device=self.validation.device).long().view(count, self.batch_size)
        return [self._window(self.validation, row) for row in starts]


def language_model_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
