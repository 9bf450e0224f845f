"""Shared fixtures: a tiny random Llama built in code, and the real SmolLM2 (converted once, cached)."""
from __future__ import annotations

import pytest
import torch


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, inter: int = 96, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def random_hessian(n: int, tokens: int = 256, seed: int = 0, correlated: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g)
    if correlated:
        X = X @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    return 2 * X.T @ X / tokens


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2_path():
    from lopro.data.assets import resolve_builtin_model

    return resolve_builtin_model("smollm2-135m")
