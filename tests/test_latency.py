"""The warm-latency model that lets a shape run once: pure, no upstream."""

from __future__ import annotations

import random

import pytest

from warmgate.latency import MIN_POINTS, Batch, LatencyModel, is_warm, prior_ms


def warm_ms(b: Batch) -> float:
    """A made-up engine: 30 ms a request, 0.4 ms a prompt token, 5 ms a step, 0.2 ms a
    sequence-step."""
    return 30 + 0.4 * b.prompt_tokens + 5 * b.decode_steps + 0.2 * b.decode_steps * b.seqs


BATCHES = [Batch(p, d, s) for p in (32, 256, 2048) for d in (4, 16) for s in (1, 8, 64)]


def test_no_prediction_until_enough_warm_runs() -> None:
    model = LatencyModel()
    for b in BATCHES[: MIN_POINTS - 1]:
        model.observe(b, warm_ms(b))
        assert model.predict(Batch(100, 16, 1)) is None
    model.observe(BATCHES[MIN_POINTS], warm_ms(BATCHES[MIN_POINTS]))
    assert model.predict(Batch(100, 16, 1)) is not None


def test_fit_recovers_the_engine_and_reaches_twice_what_it_saw() -> None:
    model = LatencyModel()
    for b in BATCHES:
        model.observe(b, warm_ms(b))
    for b in (Batch(4000, 16, 1), Batch(8, 32, 128), Batch(1000, 8, 4)):
        assert model.predict(b) == pytest.approx(warm_ms(b), rel=1e-3)
    for b in (Batch(4200, 16, 1), Batch(8, 16, 130), Batch(8, 34, 1)):
        assert model.predict(b) is None  # too far from any warm run: repeat it instead


def test_noisy_runs_still_predict_within_the_noise() -> None:
    rng = random.Random(3)
    model = LatencyModel()
    for b in BATCHES * 3:
        model.observe(b, warm_ms(b) * rng.uniform(0.9, 1.1))
    for b in BATCHES:
        predicted = model.predict(b)
        assert predicted is not None and abs(predicted - warm_ms(b)) <= 0.1 * warm_ms(b)


def test_costs_never_come_out_negative() -> None:
    """Runs where a longer prompt was (by noise) faster must not predict a negative
    cost per token: long prompts would look faster than short ones."""
    model = LatencyModel()
    for tokens, ms in ((32, 120.0), (64, 118.0), (128, 117.0), (256, 116.0), (512, 115.0)):
        model.observe(Batch(tokens, 16, 1), ms)
    short, long = model.predict(Batch(32, 16, 1)), model.predict(Batch(1024, 16, 1))
    assert short is not None and long is not None and long >= short > 0


def test_a_single_repeated_shape_predicts_itself() -> None:
    model = LatencyModel()
    for ms in (100.0, 102.0, 98.0, 100.0):
        model.observe(Batch(32, 16, 1), ms)
    assert model.predict(Batch(32, 16, 1)) == pytest.approx(100.0, rel=0.02)


def test_is_warm_within_tolerance_and_slack() -> None:
    assert is_warm(119.0, 100.0, 0.2, 0.0)
    assert not is_warm(121.0, 100.0, 0.2, 0.0)
    assert is_warm(129.0, 100.0, 0.2, 10.0)
    assert not is_warm(10.0, None, 0.2, 10.0)  # no model yet: never warm on one run


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        LatencyModel().observe(Batch(1, 1, 1), -1.0)


def test_prior_grows_with_prompt_steps_and_batch() -> None:
    base = prior_ms(Batch(32, 16, 1))
    assert prior_ms(Batch(2048, 16, 1)) > base
    assert prior_ms(Batch(32, 64, 1)) > base
    assert prior_ms(Batch(32, 16, 64)) > base
