"""Strict JAX settings and shared compiled functions for the test suite.

Every test module uses the same small configs (fixed shapes) so each jitted function is
compiled once per session; hypothesis draws values (seeds, positions, rates), never shapes.
"""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,  # first examples include compiles
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_cfg():
    """A small model and short run: what most property tests train."""
    from toymesa.config import Config, TaskConfig, TrainConfig, tiny

    return Config(model=tiny(), task=TaskConfig(rule="single", reasoning="cot"), train=TrainConfig(batch_size=8, steps=6, warmup_steps=2))
