"""Strict JAX settings and shared compiled functions for the test suite.

Every test module uses the same small configs (fixed shapes) so each jitted function is
compiled once per session; hypothesis draws values (seeds, positions, rates), never shapes.
"""

import dataclasses
import os

# Compiles dominate this suite's time. XLA's CPU backend compiles about twice as fast at
# optimisation level 0, and its older elemental emitters (fusion emitters off) about 2.5x
# faster again (a tiny model's train step: 2.6 s -> 1.0 s on 2 cores); the programs'
# semantics do not change. Set either flag in XLA_FLAGS yourself to test the default backend
# (e.g. --xla_backend_optimization_level=2 --xla_cpu_use_fusion_emitters=true). Must run
# before jax starts.
FAST_COMPILE = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false"}
for flag, value in FAST_COMPILE.items():
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{flag}={value}").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

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


# Two *different* programs doing the same float operations round alike on XLA's default CPU
# emitters; the older emitters fuse them differently and may reorder an operation (measured: 5
# ulp of the array's largest value). Tests of "the same numbers, by another program" are bitwise
# there and within CROSS_PROGRAM_ULP here; a real change (one safety step, one IG node) moves
# numbers by orders of magnitude more.
BITWISE_ACROSS_PROGRAMS = "xla_cpu_use_fusion_emitters=false" not in os.environ["XLA_FLAGS"]
CROSS_PROGRAM_ULP = 32


@pytest.fixture(scope="session")
def same_numbers():
    """`same_numbers(x, y)` asserts that another program computed the same array: bit for bit
    on the default emitters, within CROSS_PROGRAM_ULP ulp of max|y| on the fast-compiling ones
    (`same_numbers.bitwise` says which)."""

    def check(x, y):
        x, y = np.asarray(x), np.asarray(y)
        if BITWISE_ACROSS_PROGRAMS or not np.issubdtype(y.dtype, np.floating):
            assert np.array_equal(x, y, equal_nan=True)
        else:
            scale = np.nanmax(np.abs(y), initial=0.0)
            np.testing.assert_allclose(x, y, rtol=0, atol=CROSS_PROGRAM_ULP * np.spacing(scale.astype(y.dtype)))

    check.bitwise = BITWISE_ACROSS_PROGRAMS
    return check


@pytest.fixture(scope="session")
def tiny_cfg():
    """A small model and short run: what most property tests train."""
    from toymesa.config import Config, TaskConfig, TrainConfig
    from toymesa.presets import tiny

    return Config(model=tiny(), task=TaskConfig(rule="single", reasoning="cot"), train=TrainConfig(batch_size=8, steps=6, warmup_steps=2))


@pytest.fixture(scope="session")
def variant_cfg(tiny_cfg):
    """The tiny config with the model options flipped: no LayerNorm, attention-only blocks."""
    return dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, layer_norm=False, attn_only=True))


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    """Freshly initialised parameters of the tiny model (fixed key)."""
    from toymesa import model

    return model.init_params(tiny_cfg, jax.random.key(0))


@pytest.fixture(scope="session")
def variant_params(variant_cfg):
    from toymesa import model

    return model.init_params(variant_cfg, jax.random.key(1))


TINY_RUN = {
    "name": "tinyrun",
    "seeds": [3, 5],
    "base": {"model": "tiny", "task": {"rule": "latent", "seq_len": "min"}, "train": {"steps": 6, "batch_size": 8}},
    "grid": {"hparams": {"lr": [1e-3, 3e-3]}},  # one shape group: one chunk, one compile
    "run": {"eval_prompts": 8},
    "hypotheses": [
        {"id": "H1", "statement": "s", "prediction": "p", "metric": "triggered_defection", "rule": {"confirm": "low > 0.5", "refute": "high < 0.5"}}
    ],
}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A stored run folder of the tiny model (2 cells x 2 seeds, 6 steps), as `toymesa run`
    writes it (verdicts.csv included). Shared by the commands that read stored runs (show,
    meter, verify): a test that changes it works on a copy, except for files it adds."""
    from toymesa import experiment, spec, store, sweep

    out = tmp_path_factory.mktemp("tinyrun") / "run"
    sweep.run(spec.parse(TINY_RUN), out, progress=False, echo=lambda *_: None)
    store.save_frame(experiment.for_results(out).verdicts(out), out / "verdicts.csv")
    return out
