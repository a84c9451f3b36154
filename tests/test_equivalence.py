"""Each gcomp hook against DDP without a hook, on 2 and 4 gloo ranks, with many equal-size buckets.

Small ``bucket_cap_mb`` splits the MLP into many buckets of the same size: if collectives were
issued in different orders on different ranks, gloo would pair one bucket's data with another's and
the gradients would drift away from plain DDP after the first steps.
"""
import pytest

from distributed import run_ranks
from models import max_relative_error, train_steps

STEPS = 6
SMALL_BUCKETS_MB = 0.004  # about one 32x32 layer per bucket


def _compare_all(rank: int, world_size: int) -> dict:
    reference = train_steps(rank, None, {}, STEPS, SMALL_BUCKETS_MB)
    errors = {}
    layouts = {}
    cases = {
        "allreduce": {},
        "fp16": {},
        "bf16": {},
        # rank >= min(n, m) for every layer and a low rate so every matrix is compressed.
        "powersgd": {"rank": 32, "min_compression_rate": 0.01, "warmup_steps": 1},
    }
    for method, options in cases.items():
        got = train_steps(rank, method, options, STEPS, SMALL_BUCKETS_MB)
        errors[method] = max_relative_error(got["gradients"], reference["gradients"])
        layouts[method] = got["layouts"]
        if method == "powersgd":
            errors["powersgd_compressed_steps"] = got["stats"]["compressed_steps"]
    return {"errors": errors, "layouts": layouts}


@pytest.mark.parametrize("world_size", [2, 4])
def test_hooks_match_plain_ddp(world_size):
    results = run_ranks(_compare_all, world_size, timeout=240)
    for result in results:
        errors = result["errors"]
        assert errors["allreduce"] == 0.0, errors
        assert errors["fp16"] < 2e-3, errors
        assert errors["bf16"] < 2e-2, errors
        assert errors["powersgd"] < 1e-4, errors
        assert errors["powersgd_compressed_steps"] == STEPS - 1
        assert result["layouts"]["powersgd"] >= 4, "the model should span many buckets"
