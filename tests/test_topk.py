import numpy as np
import pytest
import torch

from cache_format.encode import decode_values, dequantize_int8, encode_values, quantize_int8
from cache_format.hidden import decode_hidden, encode_hidden
from teacher_cache.topk import chunked_logit_stats, topk_logsumexp


def reference(z: torch.Tensor, k: int, temps):
    z64 = z.double()
    lse = torch.stack([torch.logsumexp(z64 / t, -1) for t in temps], -1)
    return z.topk(k, dim=-1), lse


@pytest.mark.parametrize("temps", [[1.0, 2.0], [2.0], [1.0], [0.5, 1.0, 2.0, 4.0], [0.7, 1.5, 3.0], [3.0, 1.0, 1.5]])
@pytest.mark.parametrize("scale", [1.0, 8.0, 200.0])
def test_topk_and_logsumexp_match_float64(temps, scale):
    torch.manual_seed(0)
    z = torch.randn(64, 1000) * scale + torch.randn(64, 1) * scale  # per-row offsets too
    (ref_v, ref_i), ref_lse = reference(z, 16, temps)
    v, i, lse = topk_logsumexp(z.clone(), 16, temps)
    torch.testing.assert_close(v, ref_v, rtol=0, atol=0)
    torch.testing.assert_close(i, ref_i, rtol=0, atol=0)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-6, atol=1e-5)


def test_k_equal_vocab_gives_the_whole_distribution():
    torch.manual_seed(1)
    z = torch.randn(8, 50) * 3
    v, _, lse = topk_logsumexp(z.clone(), 50, [1.0, 2.0])
    for j, t in enumerate([1.0, 2.0]):
        mass = torch.exp(v / t - lse[:, j : j + 1]).sum(-1)
        torch.testing.assert_close(mass, torch.ones(8), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_head_equals_unchunked(chunk):
    torch.manual_seed(2)
    head = torch.nn.Linear(16, 300)
    hidden = torch.randn(130, 16)
    with torch.no_grad():
        (ref_v, ref_i), ref_lse = reference(head(hidden), 10, [1.0, 2.0])
        v, i, lse = chunked_logit_stats(lambda a, b: head(hidden[a:b]), len(hidden), 10, [1.0, 2.0], chunk)
    torch.testing.assert_close(i, ref_i, rtol=0, atol=0)
    torch.testing.assert_close(v, ref_v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [("float16", 2**-11), ("bfloat16", 2**-8), ("float32", 0.0)])
def test_value_encodings_round_within_dtype_precision(dtype, tol):
    x = torch.randn(40, 7) * 10
    stored = encode_values(x, dtype)
    assert stored.dtype == {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}[dtype]
    back = decode_values(stored, dtype)
    assert ((back - x).abs() <= tol * x.abs()).all()
    # values representable in the dtype survive exactly
    exact = x.to(getattr(torch, dtype)).float()
    torch.testing.assert_close(decode_values(encode_values(exact, dtype), dtype), exact, rtol=0, atol=0)


def test_int8_hidden_quantization_error_is_at_most_half_a_step():
    torch.manual_seed(3)
    h = torch.randn(5, 9, 32) * torch.rand(5, 9, 1) * 4
    h[0, 0] = 0.0  # an all-zero token (padding) encodes to zeros
    codes, scale = quantize_int8(h)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and codes.abs().max() <= 127
    back = dequantize_int8(codes, scale)
    step = scale.float().unsqueeze(-1)
    assert ((back - h).abs() <= step / 2 + 1e-6).all()
    assert (back[0, 0] == 0).all()
    stored, stored_scale = encode_hidden(h, "int8")
    torch.testing.assert_close(decode_hidden(stored, stored_scale, "int8"), back, rtol=0, atol=0)
