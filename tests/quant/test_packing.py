import math

import pytest
import torch

from lopro.quant.packing import (
    FORMATS,
    SUPPORTED_BITS,
    pack,
    index_dtype,
    packed_length,
    unpack,
)

SHAPES = [(7, 576), (3, 1), (5, 1537), (2, 3, 17), (4, 0), (9,)]
ALL_BITS = list(range(1, 9))


def _random_codes(shape, bits, seed=0, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed * 31 + bits)
    return torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(dtype)


def _reference_pack(codes, bits):
    """Little-endian bit stream, one row at a time, via explicit bit expansion."""
    rows = codes.reshape(-1, codes.shape[-1]).to(torch.int64)
    out = []
    for row in rows:
        stream = [(int(c) >> b) & 1 for c in row for b in range(bits)]
        stream += [0] * (-len(stream) % 8)
        out.append([sum(stream[i + b] << b for b in range(8)) for i in range(0, len(stream), 8)])
    return torch.tensor(out, dtype=torch.uint8).reshape(*codes.shape[:-1], -1)


def test_formats_table():
    assert {2, 3, 4, 8} <= set(FORMATS)
    assert SUPPORTED_BITS == tuple(ALL_BITS)
    assert (FORMATS[3].codes_per_group, FORMATS[3].bytes_per_group) == (8, 3)
    assert (FORMATS[4].codes_per_group, FORMATS[4].bytes_per_group) == (2, 1)
    for bits, fmt in FORMATS.items():
        assert fmt.bits == bits
        assert fmt.codes_per_group * bits == fmt.bytes_per_group * 8
        codes = _random_codes((2, 11), bits)
        assert torch.equal(fmt.unpack(fmt.pack(codes), 11), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_exact(bits, shape):
    codes = _random_codes(shape, bits, seed=len(shape) + shape[-1])
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.device == codes.device
    assert packed.is_contiguous()
    assert packed.shape == (*shape[:-1], math.ceil(shape[-1] * bits / 8))
    assert packed.shape[-1] == packed_length(shape[-1], bits)
    out = unpack(packed, bits, shape[-1])
    assert out.dtype == torch.uint8 and out.shape == codes.shape
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_dense_size_on_disk(bits):
    codes = _random_codes((16, 4096), bits)
    packed = pack(codes, bits)
    assert packed.numel() == 16 * 4096 * bits // 8
    assert packed.untyped_storage().nbytes() == packed.numel()


@pytest.mark.parametrize("bits", ALL_BITS)
def test_layout_is_little_endian_bit_stream(bits):
    codes = _random_codes((3, 13), bits, seed=5)
    assert torch.equal(pack(codes, bits), _reference_pack(codes, bits))


def test_known_bytes():
    assert pack(torch.tensor([[1, 2]]), 4).tolist() == [[0x21]]
    assert pack(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    # 3-bit: eight 7s fill exactly three 0xFF bytes; a single code takes one byte.
    assert pack(torch.full((1, 8), 7), 3).tolist() == [[255, 255, 255]]
    assert pack(torch.tensor([[5]]), 3).tolist() == [[5]]
    assert pack(torch.tensor([[0, 1, 0]]), 3).tolist() == [[0b00001000, 0]]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_input_dtypes_and_output_dtype(dtype):
    codes = _random_codes((4, 37), 3, dtype=dtype)
    packed = pack(codes, 3)
    assert torch.equal(packed, pack(codes.to(torch.uint8), 3))
    out = unpack(packed, 3, 37, dtype=dtype)
    assert out.dtype == dtype and torch.equal(out, codes)


def test_non_contiguous_input():
    codes = _random_codes((40, 6), 3).t()
    assert not codes.is_contiguous()
    assert torch.equal(unpack(pack(codes, 3), 3, 40), codes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cuda_matches_cpu(bits):
    codes = _random_codes((5, 1537), bits)
    packed = pack(codes.cuda(), bits)
    assert packed.is_cuda
    assert torch.equal(packed.cpu(), pack(codes, bits))
    out = unpack(packed, bits, 1537)
    assert out.is_cuda and torch.equal(out.cpu(), codes)


@pytest.mark.parametrize("bits", [0, 9, 16, -1, 2.0, True, "4"])
def test_unsupported_bits(bits):
    codes = torch.zeros(2, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="unsupported bit width"):
        pack(codes, bits)
    with pytest.raises(ValueError, match="unsupported bit width"):
        unpack(torch.zeros(2, 1, dtype=torch.uint8), bits, 4)
    with pytest.raises(ValueError, match="unsupported bit width"):
        packed_length(4, bits)


def test_code_out_of_range_message():
    codes = torch.tensor([[0, 3, 8, 1]])
    with pytest.raises(ValueError, match=r"code 8 .*3-bit"):
        pack(codes, 3)
    with pytest.raises(ValueError, match=r"code -1 .*2-bit"):
        pack(torch.tensor([[0, -1]]), 2)
    with pytest.raises(ValueError, match=r"code 16 .*4-bit"):
        pack(torch.tensor([16], dtype=torch.uint8), 4)


def test_bad_inputs():
    with pytest.raises(TypeError, match="integer dtype"):
        pack(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="at least one dimension"):
        pack(torch.tensor(1), 4)
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(2, 2, dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match="need 2"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 4)
    with pytest.raises(ValueError, match="non-negative"):
        packed_length(-1, 4)


def test_packed_length():
    assert packed_length(0, 3) == 0
    assert packed_length(1, 3) == 1
    assert packed_length(8, 3) == 3
    assert packed_length(9, 3) == 4
    assert packed_length(576, 2) == 144
    assert packed_length(1537, 4) == 769
    assert packed_length(17, 8) == 17


def test_index_dtype():
    assert index_dtype(32768) == torch.int16  # indices 0 .. 32767
    assert index_dtype(32769) == torch.int32
