"""SamplingParams refuses what the engine cannot run (the offline API has no HTTP layer in front):
non-finite floats, a seed beyond 64 bits (torch's seeding overflowed), booleans and strings where
integers belong."""

from __future__ import annotations

import math

import pytest

from pdray import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": math.nan}, "min_p"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"presence_penalty": -math.inf}, "presence_penalty"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"temperature": "0.5"}, "temperature"),
        ({"seed": 2**80}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"n": True}, "n"),
        ({"max_tokens": True}, "max_tokens"),
        ({"top_k": 2.0}, "top_k"),
        ({"stop_token_ids": ["5"]}, "stop_token_ids"),
        ({"stop_token_ids": [1.9]}, "stop_token_ids"),
    ],
)
def test_bad_values_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        SamplingParams(**kwargs)


def test_edge_values_are_accepted():
    params = SamplingParams(seed=2**63 - 1, stop_token_ids=(3, 4), temperature=0, top_p=1.0)
    assert params.seed == 2**63 - 1 and params.stop_token_ids == [3, 4]
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)
