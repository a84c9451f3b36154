"""Bad configuration fails loudly and early, on every rank, never with a hang."""
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import gcomp
from distributed import run_ranks
from gcomp.hooks.layout import check_bucket_buffer
from models import batch, make_mlp


@pytest.mark.parametrize(
    "options, error, word",
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": -3}, ValueError, "rank"),
        ({"rank": 2.5}, ValueError, "rank"),
        ({"rank": True}, ValueError, "rank"),
        ({"min_compression_rate": 0}, ValueError, "min_compression_rate"),
        ({"min_compression_rate": float("nan")}, ValueError, "min_compression_rate"),
        ({"orthogonalization_epsilon": -1e-8}, ValueError, "orthogonalization_epsilon"),
        ({"orthogonalization_epsilon": float("inf")}, ValueError, "orthogonalization_epsilon"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"warm_start": "yes"}, TypeError, "warm_start"),
        ({"layer_ranks": {"fc.weight": 0}}, ValueError, "layer_ranks"),
        ({"factor_dtype": "int8"}, ValueError, "factor_dtype"),
        ({"factor_dtype": torch.float64}, ValueError, "factor_dtype"),
        ({"no_such_option": 1}, TypeError, "no_such_option"),
    ],
)
def test_invalid_powersgd_options(options, error, word):
    with pytest.raises(error, match=word):
        gcomp.PowerSGDState(**options)


@pytest.mark.parametrize(
    "buffer",
    [torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.complex64), torch.zeros(4).to_sparse()],
)
def test_unsupported_bucket_dtypes(buffer):
    with pytest.raises(TypeError, match="gcomp hooks"):
        check_bucket_buffer(buffer)


@pytest.mark.parametrize(
    "hook, state",
    [
        (gcomp.powersgd_hook, object()),
        (gcomp.powersgd_hook, gcomp.TopKState()),
        (gcomp.topk_hook, gcomp.PowerSGDState()),
        (gcomp.topk_hook, gcomp.QuantizeState()),
        (gcomp.quantize_hook, gcomp.TopKState()),
        (gcomp.fp16_hook, gcomp.BF16State()),
        (gcomp.allreduce_hook, gcomp.FP16State()),
    ],
)
def test_each_hook_refuses_a_state_of_another_method(hook, state):
    with pytest.raises(TypeError, match=hook.__name__):
        hook(state, None)


def _registration_errors(rank: int, world_size: int) -> list[str]:
    messages = []
    ddp = DistributedDataParallel(make_mlp())
    for call in (
        lambda: gcomp.register(ddp, "no-such-method"),
        lambda: gcomp.register(make_mlp(), "powersgd"),
        lambda: gcomp.register(ddp, "powersgd", rank=0),
    ):
        try:
            call()
        except (TypeError, ValueError) as error:
            messages.append(f"{type(error).__name__}: {error}")
    state = gcomp.register(ddp, "powersgd", rank=2)
    try:
        gcomp.register(ddp, "allreduce")
    except ValueError as error:
        messages.append(f"ValueError: {error}")
    state.close()
    return messages


def test_registration_errors():
    [messages] = run_ranks(_registration_errors, 1)
    assert len(messages) == 4, messages
    assert "unknown method 'no-such-method'" in messages[0] and "powersgd" in messages[0]
    assert messages[1].startswith("TypeError") and "DistributedDataParallel" in messages[1]
    assert messages[2].startswith("ValueError") and "rank" in messages[2]
    assert "already registered" in messages[3]


def _mismatched_configuration(rank: int, world_size: int, first: dict, second: dict) -> str:
    ddp = DistributedDataParallel(make_mlp(), bucket_cap_mb=0.004)
    method, options = (first if rank == 0 else second)
    state = gcomp.register(ddp, method, **options)
    try:
        for step in range(3):
            x, y = batch(rank, step)
            torch.nn.functional.mse_loss(ddp(x), y).backward()
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        return str(error)
    finally:
        state.close()
    return "no error"


@pytest.mark.parametrize(
    "first, second",
    [
        (("powersgd", {"rank": 2}), ("powersgd", {"rank": 4})),
        (("powersgd", {"rank": 2}), ("allreduce", {})),
        (("powersgd", {"factor_dtype": "bfloat16"}), ("powersgd", {})),
        (("topk", {"density": 0.01}), ("topk", {"density": 0.02})),
        (("topk", {"feedback": "ef21"}), ("topk", {"feedback": "econtrol"})),
        (("topk", {"exchange": "allgather"}), ("topk", {"exchange": "shared_indices"})),
        (("quantize", {"bits": 4}), ("topk", {})),
        (("quantize", {"rounding": "nearest"}), ("quantize", {"rounding": "stochastic"})),
        (("quantize", {"chunk": 256}), ("quantize", {"chunk": 512})),
    ],
)
def test_configuration_mismatch_raises_on_every_rank(first, second):
    messages = run_ranks(_mismatched_configuration, 2, first, second, timeout=90)
    for message in messages:
        assert "ranks disagree on the compression configuration" in message, message


class _Renamed(torch.nn.Module):
    """Same shapes as make_mlp(), other parameter names: DDP's own shape check passes."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_mlp()

    def forward(self, x):
        return self.inner(x)


def _different_models(rank: int, world_size: int) -> str:
    ddp = DistributedDataParallel(make_mlp() if rank == 0 else _Renamed(), bucket_cap_mb=0.004)
    state = gcomp.register(ddp, "powersgd", rank=2, warmup_steps=0)
    try:
        x, y = batch(rank, 0)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        return str(error)
    finally:
        state.close()
    return "no error"


def test_different_models_raise_on_every_rank():
    for message in run_ranks(_different_models, 2, timeout=90):
        assert "ranks disagree on the layers of a gradient bucket" in message, message
