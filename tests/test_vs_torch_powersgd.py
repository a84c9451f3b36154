"""gcomp PowerSGD trains like PyTorch's own ``powerSGD_hook`` (same rank, data and seed)."""
import torch
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

import gcomp
from distributed import run_ranks
from gcomp.examples.charlm import Batches, CharLM, CharLMConfig, language_model_loss, load_corpus

STEPS, WARMUP, RANK = 80, 10, 4
# PyTorch's hook deadlocks on gloo once the model spans two buckets: give DDP one bucket.
ONE_BUCKET_MB = 100.0


def _train(rank: int, world_size: int, method: str) -> dict:
    torch.manual_seed(0)
    config = CharLMConfig.preset("tiny")
    model = CharLM(config)
    ddp = DistributedDataParallel(model, bucket_cap_mb=ONE_BUCKET_MB)
    state = None
    if method == "gcomp":
        state = gcomp.register(ddp, "powersgd", rank=RANK, warmup_steps=WARMUP)
    elif method == "torch":
        torch_state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=RANK, start_powerSGD_iter=WARMUP)
        ddp.register_comm_hook(torch_state, powerSGD_hook.powerSGD_hook)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
    batches = Batches(load_corpus(max_bytes=600_000), config.context, 16, seed=0, rank=rank)
    losses = []
    for _ in range(STEPS):
        x, y = batches.next()
        optimizer.zero_grad()
        loss = language_model_loss(ddp, x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    shapes = [tuple(p.shape) for p in model.parameters()]
    stats = state.stats() if state else None
    if state:
        state.close()
    return {"losses": losses, "stats": stats, "shapes": shapes}


def _all_methods(rank: int, world_size: int) -> dict:
    return {method: _train(rank, world_size, method) for method in ("none", "torch", "gcomp")}


def _expected_ratio(shapes: list[tuple[int, ...]]) -> float:
    """Uncompressed bytes / gcomp bytes from the layer shapes alone (rank 4, rate 2)."""
    numel = dense = factors = 0
    for shape in shapes:
        size = 1
        for s in shape:
            size *= s
        numel += size
        n, m = shape[0], size // shape[0]
        r = min(n, m, RANK)
        if len(shape) >= 2 and (n + m) * r * 2 < n * m:
            factors += (n + m) * r
        else:
            dense += size
    sent = WARMUP * numel + (STEPS - WARMUP) * (dense + factors)
    return STEPS * numel / sent


def test_same_loss_as_pytorch_powersgd():
    first, _ = run_ranks(_all_methods, 2, timeout=300)
    tail = lambda losses: sum(losses[-15:]) / 15  # noqa: E731
    dense, torch_hook, ours = (tail(first[m]["losses"]) for m in ("none", "torch", "gcomp"))
    assert first["none"]["losses"][-1] < first["none"]["losses"][0] - 1.0, "the model must actually learn"
    # Tolerance: 3% of the loss, between the two PowerSGD implementations.
    assert abs(ours - torch_hook) < 0.03 * torch_hook, (ours, torch_hook, dense)
    stats = first["gcomp"]["stats"]
    assert stats["compressed_steps"] == STEPS - WARMUP
    assert abs(stats["compression_ratio"] - _expected_ratio(first["gcomp"]["shapes"])) < 1e-9
