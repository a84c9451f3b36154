"""The agreement check: before a setting changes the size or meaning of a collective, every rank
proves it holds the same setting, or every rank raises.

Ranks that disagree on a hyperparameter, a bucket's layers, a per-layer override or an adaptive
decision would otherwise issue collectives of different sizes (a hang, or data mixed between
layers). A check costs one 8-byte allgather: each rank sends a CRC-32 of a canonical text of what
must agree. Only when the checksums differ (the failure path) are the texts themselves gathered,
so the error can say what differs. Every rank sees the same gathered checksums, so every rank
takes the same branch: they all raise together, none is left waiting.

This module is the only place gcomp compares settings across ranks; hooks and the controller call
:func:`check_agreement` with a topic and the text that must match.
"""
from __future__ import annotations

import zlib
from typing import Any, Optional

import torch
import torch.distributed as dist

from .device import DeviceRuntime
from .transport import Transport


def canonical_text(value: Any) -> str:
    """A text that is equal on two ranks iff ``value`` is (dicts sorted by key, floats by repr)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{canonical_text(k)}:{canonical_text(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(canonical_text(v) for v in value) + "]"
    return repr(value)


def check_agreement(
    transport: Transport,
    runtime: DeviceRuntime,
    topic: str,
    value: Any,
    device: torch.device = torch.device("cpu"),
    hint: str = "",
) -> None:
    """Raise ``ValueError`` on every rank unless ``value`` is the same on every rank.

    Args:
        topic: what is compared, for the message (e.g. "the compression configuration").
        value: plain Python data (compared through :func:`canonical_text`).
        device: the device of the bucket next to which the check runs (the checksum goes where the
            backend wants it: see :meth:`Transport.small_tensor_device`).
        hint: what the user should do about a disagreement.
    """
    text = canonical_text(value)
    checksum = zlib.crc32(text.encode("utf-8"))
    mine = torch.tensor([checksum], dtype=torch.int64, device=transport.small_tensor_device(device))
    everyone = runtime.to_list(transport.allgather(mine, traffic=None).flatten())
    if all(other == everyone[0] for other in everyone):
        return
    texts: list[Optional[str]] = [None] * transport.world_size
    dist.all_gather_object(texts, text, group=transport.process_group)
    differing = [rank for rank, other in enumerate(texts) if other != texts[0]]
    raise ValueError(
        f"gcomp: ranks disagree on {topic}: rank 0 has {texts[0]}, rank {differing[0]} has {texts[differing[0]]}. "
        f"{hint}".rstrip()
    )
