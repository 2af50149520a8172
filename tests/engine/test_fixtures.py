"""The engine tests' tiny models tell their inputs apart, so a mixed-up request cannot pass.

Before ``ENGINE_OVERRIDES`` the tiny T5 gave 6 distinct greedy outputs over these 30 inputs,
each one token repeated, and the tiny BART 20 (1.8 distinct tokens per output).
"""

import numpy as np
import pytest

import encdec


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_greedy_outputs_depend_on_the_input(tiny_models, family):
    rng = np.random.default_rng(0)
    inputs = [rng.integers(3, 90, int(rng.integers(1, 21))).tolist() for _ in range(30)]
    outputs = [tuple(o.token_ids) for o in encdec.reference_generate(tiny_models[family], inputs, 12)]
    assert len(set(outputs)) >= 25, f"{len(set(outputs))} distinct greedy outputs over 30 inputs"
    assert np.mean([len(set(o)) for o in outputs]) >= 3, "outputs repeat one token"
