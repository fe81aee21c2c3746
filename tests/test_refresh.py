"""Adaptive refresh of statistics (the ``"threshold"`` rule and the noise rule)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spngd import SPNGD, AdaptiveRefresh
from spngd.refresh import MAX_POOLED, RefreshPolicy, computed_shares, relative_changes


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 25, 3),
    )


def _batch(seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(64, 2, 5, 5, generator=gen), torch.randint(
        0, 3, (64,), generator=gen
    )


def _step(model: nn.Module, opt: SPNGD, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _refresh_steps(
    opt: SPNGD, model: nn.Module, steps: int, batch_seed: int | None, scale: float = 1.0
) -> dict[tuple[str, int], list[int]]:
    """Run ``steps`` steps; return, per statistic key, the steps at which it was computed."""
    seen: dict[tuple[str, int], list[int]] = {}
    for _ in range(steps):
        step = opt.steps_taken
        for name, block in opt.curvature.items():
            for i, computed in enumerate(block.to_compute):
                if computed:
                    seen.setdefault((name, i), []).append(step)
        x, y = _batch(step if batch_seed is None else batch_seed, scale)
        _step(model, opt, x, y)
    return seen


def test_infinite_alpha_doubles_the_gaps_up_to_the_cap() -> None:
    model = _model()
    opt = SPNGD(
        model, lr=0.01, refresh=AdaptiveRefresh(alpha=math.inf, max_interval=8, warmup_steps=3)
    )
    seen = _refresh_steps(opt, model, 40, batch_seed=None)
    for steps in seen.values():
        gaps = [b - a for a, b in itertools.pairwise(steps)]
        assert gaps[:6] == [1, 1, 1, 2, 4, 8]  # warm-up (steps 0-3), then 2, 4, 8, 8, ...
        assert set(gaps[5:]) == {8}


def test_stationary_problem_grows_intervals_and_skips_work() -> None:
    model = _model()
    opt = SPNGD(model, lr=0.0, refresh=AdaptiveRefresh(max_interval=16))
    _refresh_steps(opt, model, 60, batch_seed=1)  # the same batch every step, weights frozen
    assert all(interval == 16 for interval in opt.refresh.interval.values())
    totals = opt.refresh_counts()["total"]
    assert totals["stats_skipped"] > totals["stats_computed"]
    assert totals["inverses_skipped"] > totals["inverses_computed"]
    layer = opt.refresh_counts()["1"]
    assert layer["stats_computed"] + layer["stats_skipped"] == 60
    # per statistic: A and G of the conv and the Linear, F of the BatchNorm, 60 steps each
    for statistic, layers in (("A", 2), ("G", 2), ("F", 1)):
        assert totals[f"{statistic}_computed"] + totals[f"{statistic}_skipped"] == 60 * layers
    shares = computed_shares(totals)
    assert shares.keys() == {"stats", "inverses", "A", "G", "F"}
    assert shares["F"] == totals["F_computed"] / 60 < 0.5
    every_step_model = _model()
    every_step = SPNGD(every_step_model, lr=0.0, stat_interval=1)
    _refresh_steps(every_step, every_step_model, 2, batch_seed=1)
    assert every_step.refresh_counts()["total"]["F_skipped"] == 0  # present although zero


def test_a_shift_of_the_input_distribution_is_caught_within_the_cap() -> None:
    model = _model()
    cap = 8
    opt = SPNGD(model, lr=0.0, refresh=AdaptiveRefresh(max_interval=cap, warmup_steps=2))
    _refresh_steps(opt, model, 40, batch_seed=1)
    assert all(interval == cap for interval in opt.refresh.interval.values())
    shift = opt.steps_taken
    seen = _refresh_steps(opt, model, cap + 2, batch_seed=2, scale=10.0)
    for key, steps in seen.items():
        assert steps[0] < shift + cap, key  # refreshed again within the cap
    # The conv's A sees the scaled input (BatchNorm hides the scale from later layers)
    conv_a = [step for step in seen[("0", 0)] if step >= shift]
    assert conv_a[1] - conv_a[0] == 1  # changed: the next step's estimate replaces it


def test_refresh_every_step_equals_the_plain_optimizer() -> None:
    models = [_model() for _ in range(3)]
    opts = [
        SPNGD(models[0], lr=0.05, stat_interval=1),
        SPNGD(models[1], lr=0.05, refresh=AdaptiveRefresh(alpha=-1.0)),
        SPNGD(models[2], lr=0.05, refresh=AdaptiveRefresh(alpha=-1.0, warmup_steps=0)),
    ]
    for step in range(12):
        for model, opt in zip(models, opts, strict=True):
            _step(model, opt, *_batch(step))
    for model in models[1:]:
        for a, b in zip(models[0].parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for opt in opts:
        assert opt.refresh_counts()["total"]["stats_skipped"] == 0
        assert opt.refresh_counts()["total"]["inverses_skipped"] == 0


@pytest.mark.parametrize(
    ("settings", "compared_at"),
    [({"refresh": AdaptiveRefresh(warmup_steps=3)}, [3, 4, 5]), ({"stat_interval": 1}, [])],
    ids=["adaptive", "every-step"],
)
def test_changes_are_computed_only_where_the_rule_reads_them(
    settings: dict[str, object], compared_at: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relative changes feed the adaptive rule past its warm-up alone: in the
    warm-up and at fixed intervals no pair is compared (each step computes statistics)."""
    model = _model()
    opt = SPNGD(model, lr=0.01, **settings)  # type: ignore[arg-type]
    compared: list[int] = []

    def spy(references: list[torch.Tensor], fresh: list[torch.Tensor]) -> list[torch.Tensor]:
        if references:
            compared.append(opt.steps_taken)
        return relative_changes(references, fresh)

    monkeypatch.setattr("spngd.preconditioner.relative_changes", spy)
    _refresh_steps(opt, model, 6, batch_seed=None)
    assert compared == compared_at


def test_fixed_intervals_compute_statistics_and_inverses_on_schedule() -> None:
    model = _model()
    opt = SPNGD(model, lr=0.01, stat_interval=3, inverse_interval=6)
    seen = _refresh_steps(opt, model, 13, batch_seed=None)
    assert all(steps == [0, 3, 6, 9, 12] for steps in seen.values())
    assert opt.refresh_counts()["0"] == {
        "stats_computed": 10,
        "stats_skipped": 16,
        "inverses_computed": 3,
        "inverses_skipped": 10,
        "A_computed": 5,
        "A_skipped": 8,
        "G_computed": 5,
        "G_skipped": 8,
    }


def test_skipped_steps_install_no_hooks() -> None:
    model = _model()
    opt = SPNGD(model, lr=0.01, stat_interval=2)
    _step(model, opt, *_batch(0))
    F.cross_entropy(model(_batch(1)[0]), _batch(1)[1]).backward()  # step 1: no statistics
    assert not any(block.has_pending for block in opt.curvature.values())


def test_adaptive_state_survives_a_checkpoint() -> None:
    model = _model()
    opt = SPNGD(model, lr=0.02, refresh=AdaptiveRefresh(alpha=0.5, warmup_steps=2))
    for step in range(15):
        _step(model, opt, *_batch(step))
    resumed_model = copy.deepcopy(model)
    resumed = SPNGD(resumed_model, lr=0.02, refresh=AdaptiveRefresh(alpha=0.5, warmup_steps=2))
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(15, 30):
        _step(model, opt, *_batch(step))
        _step(resumed_model, resumed, *_batch(step))
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.refresh_counts() == opt.refresh_counts()


def test_a_checkpoint_without_measured_noise_resumes_and_measures_it_again() -> None:
    model = _model()
    opt = SPNGD(model, lr=0.02, refresh=AdaptiveRefresh(warmup_steps=2))
    for step in range(6):
        _step(model, opt, *_batch(step))
    state = copy.deepcopy(opt.state_dict())
    del state["refresh"]["noise"]  # a refresh state that holds no measured noise
    resumed = SPNGD(model, lr=0.02, refresh=AdaptiveRefresh(warmup_steps=2))
    resumed.load_state_dict(state)
    assert resumed.refresh.noise == {}
    assert resumed.refresh.interval == opt.refresh.interval
    for step in range(6, 40):
        _step(model, resumed, *_batch(step))
    assert set(resumed.refresh.noise) == set(opt.refresh.noise)
    assert all(noise > 0 for noise in resumed.refresh.noise.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stat_interval": 0}, "stat_interval must be an int >= 1"),
        ({"inverse_interval": 5}, "inverse_interval must be None without a fixed stat interval"),
        ({"refresh": "fast"}, "refresh must be an AdaptiveRefresh"),
    ],
)
def test_bad_refresh_settings_name_the_problem(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        SPNGD(_model(), lr=0.1, **kwargs)  # type: ignore[arg-type]


def test_adaptive_knobs_are_validated() -> None:
    with pytest.raises(ValueError, match="grow must be"):
        AdaptiveRefresh(grow="triple")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_interval must be a positive integer"):
        AdaptiveRefresh(max_interval=0)
    policy = RefreshPolicy(None, None, AdaptiveRefresh(shrink="halve", grow="plus1"))
    assert policy.adaptive.grown(3) == 4 and policy.adaptive.shrunk(5) == 2


def _run_stream(
    policy: RefreshPolicy,
    steps: int,
    noise: float,
    shift_at: int | None = None,
    changes: list[float] | None = None,
    errors: list[float] | None = None,
) -> list[int]:
    """Feed ``policy`` a synthetic statistic: a fixed SPD matrix plus independent noise of
    relative size ``noise`` in each half of every batch (the fresh estimate is their mean,
    its measured noise their difference, as the blocks measure it), scaled x3 from
    ``shift_at`` on, folded into the statistic in use with the policy's weight. Returns
    the steps it was computed at; appends each relative change to ``changes`` and each
    step's relative error of the statistic in use to ``errors``."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, 16, generator=gen)
    base = base @ base.T + 16 * torch.eye(16)

    def half() -> torch.Tensor:
        perturbation = torch.randn(16, 16, generator=gen)
        return base + noise * base.norm() / 16 * (perturbation + perturbation.T) / 2

    in_use = None
    computed = []
    for step in range(steps):
        scale = 3.0 if shift_at is not None and step >= shift_at else 1.0
        if errors is not None and in_use is not None:
            errors.append(((in_use - scale * base).norm() / (scale * base).norm()).item())
        if not policy.is_due(("layer", 0), step):
            continue
        first, second = scale * half(), scale * half()
        fresh = (first + second) / 2
        measured = ((first - second).square().sum() / (2 * fresh.square().sum())).item()
        change = None
        if in_use is not None:
            (change_tensor,) = relative_changes([in_use], [fresh])
            change = change_tensor.item()
            if changes is not None:
                changes.append(change)
        weight = policy.fresh_weight(("layer", 0))
        in_use = fresh if in_use is None else in_use + weight * (fresh - in_use)
        policy.observe(("layer", 0), step, change, measured)
        computed.append(step)
    return computed


@pytest.mark.parametrize("noise", [0.3, 0.6])
def test_noise_rule_skips_a_noisy_stationary_statistic_the_threshold_rule_recomputes(
    noise: float,
) -> None:
    noisy = RefreshPolicy(None, None, AdaptiveRefresh(max_interval=16))
    threshold = RefreshPolicy(None, None, AdaptiveRefresh(rule="threshold", max_interval=16))
    changes: list[float] = []
    by_noise = _run_stream(noisy, 200, noise)
    by_threshold = _run_stream(threshold, 200, noise, changes=changes)
    # Batch-to-batch differences of this size are far above alpha = 0.1: the threshold
    # rule shrinks the interval every time; the noise rule knows them for noise and grows
    # to the cap.
    assert min(changes) > 0.1
    assert len(by_threshold) == 200
    assert noisy.interval[("layer", 0)] == 16
    assert len(by_noise) < 30
    # The measured noise is what two batches' estimates differ by (squared, relative).
    mean_squared_change = sum(c * c for c in changes) / len(changes)
    assert 0.7 < noisy.noise[("layer", 0)] / mean_squared_change < 1.4


def test_noise_rule_catches_a_real_shift_within_the_cap() -> None:
    policy = RefreshPolicy(None, None, AdaptiveRefresh(max_interval=16))
    computed = _run_stream(policy, 200, 0.3, shift_at=100)
    after = [step for step in computed if step >= 100]
    # The first refresh after the shift sees it (within the cap) and shrinks the interval;
    # the pooled statistic is replaced by the next step's estimate.
    assert after[0] < 100 + 16
    assert after[1] == after[0] + 1
    # Then, the noise being what it was, the interval grows back to the cap.
    assert policy.interval[("layer", 0)] == 16


@pytest.mark.parametrize(("shrink", "after"), [("halve", [1]), ("reset", [1, 3, 7, 15, 31])])
def test_a_chance_excursion_at_the_cap_costs_what_the_shrink_says(
    shrink: str, after: list[int]
) -> None:
    """A noisy stationary statistic at the cap (noise 0.5, changes d^2 = 0.25) once lands
    past the bound (d^2 = 1): the next step's estimate replaces the statistic, then
    ``halve`` is back at the cap, ``reset`` climbs from 1 (the default halves)."""
    assert AdaptiveRefresh().shrink == "halve"
    policy = RefreshPolicy(
        None, None, AdaptiveRefresh(shrink=shrink, warmup_steps=0, max_interval=32)
    )  # type: ignore[arg-type]
    key, noise = ("layer", 0), 0.5
    policy.observe(key, 0, None, noise)
    while policy.interval[key] < 32:
        policy.observe(key, policy.next_step[key], 0.5, noise)
    start = policy.next_step[key]
    policy.observe(key, start, 1.0, noise)
    computed = []
    while policy.next_step[key] < start + 32:
        step = policy.next_step[key]
        computed.append(step - start)
        policy.observe(key, step, 0.5, noise)
    assert computed == after
    assert policy.interval[key] == 32


def test_pooling_averages_the_estimates_while_their_changes_stay_small() -> None:
    knobs = AdaptiveRefresh(alpha=0.1, rule="threshold", warmup_steps=2)
    policy = RefreshPolicy(None, None, knobs)
    key = ("layer", 0)
    weights = []
    for step, change in [(0, None), (1, 0.5), (2, 0.05), (4, 0.05), (8, 0.05), (16, 0.5)]:
        weights.append(policy.fresh_weight(key))
        policy.observe(key, step, change, None)
    # warm-up: replace; a small change: the estimates so far pool (1/2, 1/3); a large one
    # restarts the pool, so the estimate after it replaces the statistic
    assert weights == [1.0, 1.0, 1.0, 1 / 2, 1 / 3, 1 / 4]
    assert policy.fresh_weight(key) == 1.0
    for step in range(17, 40):  # a long run of small changes: the weight stays >= 1/8
        policy.observe(key, step, 0.05, None)
    assert policy.fresh_weight(key) == 1 / MAX_POOLED
    latest = RefreshPolicy(None, None, AdaptiveRefresh(alpha=0.1, rule="threshold", pool=False))
    for step in range(5):
        latest.observe(key, step, 0.05, None)
        assert latest.fresh_weight(key) == 1.0


def test_a_change_after_pooling_is_replaced_the_next_step_whatever_the_shrink() -> None:
    knobs = AdaptiveRefresh(alpha=0.1, rule="threshold", shrink="halve", warmup_steps=0)
    policy = RefreshPolicy(None, None, knobs)
    key = ("layer", 0)
    step = 0
    policy.observe(key, step, None, None)
    while policy.interval[key] < 8:  # similar estimates: the interval grows, the pool too
        step = policy.next_step[key]
        policy.observe(key, step, 0.05, None)
    assert policy.fresh_weight(key) < 1.0
    step = policy.next_step[key]
    policy.observe(key, step, 0.5, None)  # folded in as one of a pool, then found changed
    assert policy.interval[key] == 4  # halved, but the mixture is replaced at once
    assert policy.next_step[key] == step + 1 and policy.fresh_weight(key) == 1.0


def test_only_adaptive_pooling_weighs_estimates() -> None:
    key = ("layer", 0)
    state = {"interval": {key: 8}, "next_step": {key: 40}, "noise": {}, "pooled": {key: 3}}
    policies = [
        RefreshPolicy(None, None, AdaptiveRefresh(pool=False)),
        RefreshPolicy(5, None, AdaptiveRefresh()),
        RefreshPolicy(None, None, AdaptiveRefresh()),
    ]
    for policy in policies:  # e.g. resumed from a pooling run's checkpoint
        policy.load_state_dict({**state, "counts": {}})
    assert [policy.fresh_weight(key) for policy in policies] == [1.0, 1.0, 1 / 4]


def test_pooling_a_noisy_stationary_statistic_cuts_its_error() -> None:
    errors: dict[bool, list[float]] = {}
    for pool in (True, False):
        policy = RefreshPolicy(None, None, AdaptiveRefresh(max_interval=4, pool=pool))
        errors[pool] = []
        _run_stream(policy, 200, 0.5, errors=errors[pool])
    # about 47 estimates after the warm-up, pooled with weights down to 1/8: the error of
    # the statistic in use falls to about a quarter of one estimate's
    late = slice(100, None)
    assert sum(errors[True][late]) < 0.3 * sum(errors[False][late])


def test_noise_rule_on_a_noiseless_stream_is_the_threshold_rule() -> None:
    for rule in ("noise", "threshold"):
        knobs = AdaptiveRefresh(rule=rule, max_interval=8, warmup_steps=3)  # type: ignore[arg-type]
        policy = RefreshPolicy(None, None, knobs)
        assert _run_stream(policy, 60, 0.0) == [0, 1, 2, 3, 5, 9, 17, 25, 33, 41, 49, 57]


def test_negative_alpha_refreshes_every_step_under_either_rule() -> None:
    for rule in ("noise", "threshold"):
        policy = RefreshPolicy(None, None, AdaptiveRefresh(alpha=-1.0, rule=rule))  # type: ignore[arg-type]
        assert _run_stream(policy, 50, 0.5) == list(range(50))


def test_bad_rule_and_margin_are_rejected() -> None:
    with pytest.raises(ValueError, match="rule must be noise or threshold, got 'magic'"):
        AdaptiveRefresh(rule="magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noise_margin must be >= 0, got -1"):
        AdaptiveRefresh(noise_margin=-1.0)
