import dataclasses
import json

import pytest
import torch

from lopro.linalg import (
    HADAMARD_CONVENTION,
    SMALL_ORDERS,
    BlockRotation,
    hadamard_factor,
    hadamard_matrix,
    hadamard_transform,
    is_supported,
)

COMPOSITE = [1, 2, 4, 40, 576, 768, 1536, 2048]


def _randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def _max_err(a: torch.Tensor, b) -> float:
    return (a - b).abs().max().item()


def _assert_orthonormal_hadamard(h: torch.Tensor, atol: float) -> None:
    n = h.shape[0]
    assert _max_err(h @ h.T, torch.eye(n, dtype=h.dtype)) <= atol
    assert _max_err(h.abs(), n**-0.5) <= 1e-6


def test_small_orders():
    assert {12, 20, 28, 36, 40, 44, 52, 60} <= set(SMALL_ORDERS)
    assert list(SMALL_ORDERS) == sorted(set(SMALL_ORDERS))
    assert all(h % 4 == 0 and h & (h - 1) != 0 for h in SMALL_ORDERS)


@pytest.mark.parametrize("h", SMALL_ORDERS)
def test_base_orders_orthogonal(h):
    _assert_orthonormal_hadamard(hadamard_matrix(h, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", COMPOSITE)
def test_composite_orthogonal(n):
    h = hadamard_matrix(n)
    # H H^T through the fast transform (O(n^2 log n)); it is checked against dense products below
    assert _max_err(hadamard_transform(h, transpose=True), torch.eye(n)) <= 1e-5
    assert _max_err(h.abs(), n**-0.5) <= 1e-6
    if n <= 576:
        _assert_orthonormal_hadamard(h, atol=1e-5)


def test_matrix_is_kronecker_and_deterministic():
    h, pow2 = hadamard_factor(576)
    expected = torch.kron(hadamard_matrix(h, torch.float64), hadamard_matrix(pow2, torch.float64))
    torch.testing.assert_close(hadamard_matrix(576, torch.float64), expected, atol=1e-15, rtol=0)
    assert torch.equal(hadamard_matrix(36), hadamard_matrix(36))
    assert hadamard_matrix(8, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "n, expected",
    [(1, (1, 1)), (2048, (1, 2048)), (576, (36, 16)), (1536, (12, 128)), (640, (20, 32)),
     (768, (12, 64)), (40, (20, 2)), (960, (60, 16)), (5120, (20, 256)), (36, (36, 1))],
)
def test_factor(n, expected):
    assert hadamard_factor(n) == expected
    assert is_supported(n)


@pytest.mark.parametrize("n", [0, -4, 3, 7, 11008, 92 * 4])
def test_unsupported(n):
    assert not is_supported(n)
    with pytest.raises(ValueError, match=str(n)):
        hadamard_factor(n)
    with pytest.raises(ValueError):
        hadamard_matrix(n)


@pytest.mark.parametrize("n", [12, 40, 64, 576, 1536])
@pytest.mark.parametrize("transpose", [False, True])
def test_transform_matches_dense_fp32(n, transpose):
    x = _randn(2, 3, n)
    h = hadamard_matrix(n)
    expected = x @ (h.T if transpose else h)
    torch.testing.assert_close(hadamard_transform(x, transpose=transpose), expected,
                               atol=2e-5, rtol=1e-5)


def test_transform_fp64_bf16_fp16():
    x = _randn(4, 576, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), x @ hadamard_matrix(576, torch.float64),
                               atol=1e-12, rtol=0)
    for dtype in (torch.bfloat16, torch.float16):
        xl = x.to(dtype)
        y = hadamard_transform(xl)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), xl.float() @ hadamard_matrix(576), atol=3e-2,
                                   rtol=2e-2)


def test_paley_is_not_symmetric_and_transpose_inverts():
    h = hadamard_matrix(12)
    assert not torch.equal(h, h.T)
    x = _randn(5, 12)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x), transpose=True), x,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [5120, 8960, 13824])
def test_large_sizes_fast_isometry(n):
    x = _randn(2, n)
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(hadamard_transform(y, transpose=True), x, atol=1e-5, rtol=0)


def test_transform_rejects_integers():
    with pytest.raises(ValueError):
        hadamard_transform(torch.ones(4, dtype=torch.int64))


# --------------------------------------------------------------------------- BlockRotation

CONFIGS = [(576, 128, 128), (320, 64, 48), (576, 0, 576), (64, 0, 12), (64, 10, 12),
           (100, 128, 64), (100, 100, 64), (40, 8, 20)]


@pytest.mark.parametrize("n, b_i, b_h", CONFIGS)
def test_block_rotation_matrix_and_apply(n, b_i, b_h):
    rot = BlockRotation(n, b_i, b_h)
    q = rot.matrix(dtype=torch.float64)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    x = _randn(3, 2, n)
    torch.testing.assert_close(rot.apply(x), x @ q.float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(rot.apply_transpose(x), x @ q.T.float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(rot.apply_transpose(rot.apply(x)), x, atol=2e-5, rtol=0)


def test_block_rotation_layout_576():
    rot = BlockRotation(576, 128, 128)
    assert (rot.num_blocks, rot.rotated, rot.leftover) == (3, (128, 512), 64)
    q = rot.matrix()
    assert torch.equal(q[:128, :128], torch.eye(128))
    assert torch.equal(q[512:, 512:], torch.eye(64))
    assert torch.equal(q[:128, 128:], torch.zeros(128, 448))
    h = hadamard_matrix(128)
    for start in (128, 256, 384):
        assert torch.equal(q[start:start + 128, start:start + 128], h)
    x = _randn(4, 576)
    y = rot.apply(x)
    assert torch.equal(y[:, :128], x[:, :128]) and torch.equal(y[:, 512:], x[:, 512:])


def test_block_rotation_identity_cases():
    for rot in (BlockRotation(100, 128, 64), BlockRotation(100, 100, 64), BlockRotation(100, 60, 64)):
        assert rot.is_identity and rot.num_blocks == 0
        assert torch.equal(rot.matrix(), torch.eye(100))
        x = _randn(2, 100)
        y = rot.apply(x)
        assert torch.equal(y, x) and y is not x


def test_block_rotation_full():
    rot = BlockRotation.full(576)
    assert (rot.block_identity, rot.block_hadamard, rot.num_blocks, rot.leftover) == (0, 576, 1, 0)
    assert torch.equal(rot.matrix(), hadamard_matrix(576))
    with pytest.raises(ValueError, match="11008"):
        BlockRotation.full(11008)


def test_block_rotation_dtype_preserved():
    x = _randn(2, 576, dtype=torch.bfloat16)
    y = BlockRotation(576, 128, 128).apply(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() @ BlockRotation(576, 128, 128).matrix(),
                               atol=3e-2, rtol=2e-2)


def test_block_rotation_dict_round_trip():
    rot = BlockRotation(576, 128, 128)
    d = json.loads(json.dumps(rot.to_dict()))
    assert d["convention"] == HADAMARD_CONVENTION
    assert BlockRotation.from_dict(d) == rot
    with pytest.raises(ValueError, match="convention"):
        BlockRotation.from_dict({**d, "convention": "other-v0"})
    with pytest.raises(ValueError, match="missing"):
        BlockRotation.from_dict({"convention": HADAMARD_CONVENTION, "n": 576})


@pytest.mark.parametrize(
    "args", [(576, 128, 7), (576, 128, 0), (576, -1, 128), (0, 0, 128), (576.0, 128, 128),
             (576, 128, 11008)]
)
def test_block_rotation_invalid(args):
    with pytest.raises(ValueError):
        BlockRotation(*args)


def test_block_rotation_wrong_width_and_frozen():
    rot = BlockRotation(576, 128, 128)
    with pytest.raises(ValueError, match="576"):
        rot.apply(torch.zeros(2, 512))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rot.n = 512


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = _randn(3, 576)
    rot = BlockRotation(576, 128, 128)
    torch.testing.assert_close(rot.apply(x.cuda()).cpu(), rot.apply(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hadamard_transform(x.cuda(), transpose=True).cpu(),
                               hadamard_transform(x, transpose=True), atol=1e-5, rtol=1e-5)
    assert rot.matrix(device="cuda").device.type == "cuda"
