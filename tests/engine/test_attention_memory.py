"""Packed attention on CPU must not keep the S×S attention probabilities for backward (the math fallback does,
which costs O(S²) memory per head and ~4x the time of the flash kernel)."""
import torch

from qforge.engine.attention import varlen_attention


def test_cpu_varlen_attention_saves_no_quadratic_tensor():
    torch.manual_seed(0)
    lengths, heads, kv_heads, dim = [384, 128], 4, 2, 16
    total = sum(lengths)
    q = torch.randn(total, heads, dim, requires_grad=True)
    k = torch.randn(total, kv_heads, dim, requires_grad=True)
    v = torch.randn(total, kv_heads, dim, requires_grad=True)
    cu_seqlens = torch.tensor([0, lengths[0], total], dtype=torch.int32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = varlen_attention(q, k, v, cu_seqlens, max(lengths), dim ** -0.5)
    assert max(saved) < lengths[0] ** 2, f"a saved tensor of {max(saved)} elements: S×S probabilities kept"

    # and it is still causal attention within each segment
    reference = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[a:b].transpose(0, 1), k[a:b].repeat_interleave(2, 1).transpose(0, 1),
        v[a:b].repeat_interleave(2, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
        for a, b in [(0, lengths[0]), (lengths[0], total)]])
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
