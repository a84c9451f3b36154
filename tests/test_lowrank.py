"""Low-rank math on its own (no process group)."""
import torch

from gcomp.compress.lowrank import effective_rank, matrix_shape, orthogonalize_, should_compress


def test_orthogonalize_gives_orthonormal_columns():
    matrices = torch.randn(3, 20, 4, generator=torch.Generator().manual_seed(0))
    orthogonalize_(matrices)
    gram = matrices.transpose(1, 2) @ matrices
    assert torch.allclose(gram, torch.eye(4).expand(3, 4, 4), atol=1e-5)


def test_rank_deficient_input_still_orthonormal():
    # A batch-16 gradient of a 32x32 layer has rank 16: rank-32 factors must still project exactly.
    low = torch.randn(32, 16) @ torch.randn(16, 32)
    p = (low @ torch.randn(32, 32)).unsqueeze(0)
    orthogonalize_(p)
    projector = p[0] @ p[0].T
    assert torch.allclose(projector @ low, low, atol=1e-3 * low.abs().max())


def test_all_zero_matrices_produce_no_nan():
    for rank in (1, 2, 5):
        for epsilon in (0.0, 1e-8):
            result = orthogonalize_(torch.zeros(2, 7, rank), epsilon)
            assert torch.isfinite(result).all()


def test_rank_one_zero_column_stays_zero():
    assert torch.equal(orthogonalize_(torch.zeros(1, 5, 1)), torch.zeros(1, 5, 1))


def test_matrix_views_and_compression_rule():
    assert matrix_shape((64, 3, 3, 3)) == (64, 27)
    assert matrix_shape((10,)) == (10, 1)
    assert effective_rank(5, 100, 8) == 5
    assert not should_compress((1000,), rank=1, min_compression_rate=2)  # biases stay dense
    assert should_compress((256, 256), rank=4, min_compression_rate=2)
    # (n + m) * r * rate < n * m: 16x16 at rank 4 and rate 2 is 256 vs 256 -> dense.
    assert not should_compress((16, 16), rank=4, min_compression_rate=2)
    assert should_compress((16, 16), rank=4, min_compression_rate=1.9)
