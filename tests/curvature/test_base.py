"""What every curvature block does: statistics from the hooks and their sampling noise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spngd import SPNGD, AdaptiveRefresh
from spngd.curvature import BatchNormBlock, Conv1dBlock, Conv2dBlock, LinearBlock
from spngd.refresh import NOISE_LEAD_STEPS
from spngd.timing import StageTimes
from tests.curvature._bruteforce import (
    bn_uv_from_delta,
    bn_xhat,
    conv_factors,
    linear_factors,
    per_example_layer_data,
)

N = 10
MEASURING = AdaptiveRefresh(warmup_steps=0)
"""The noise rule without a warm-up: noise is measured from the first step."""


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 25, 3)
    ).double()


def _batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, 5, 5, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (N,), generator=gen
    )


def _bruteforce(model: nn.Sequential, x: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    conv = conv_factors(model[0], per_example_layer_data(model, model[0], x, y))
    fc = linear_factors(per_example_layer_data(model, model[3], x, y), bias=True)
    return {"0": conv, "3": (fc[0][None], fc[1][None])}


@pytest.mark.parametrize(
    ("limit", "a_limit", "used"),
    [(None, None, (N, N)), (6, None, (6, 6)), (None, 6, (6, N)), (8, 4, (4, 8)), (4, 8, (4, 4))],
    ids=["every-example", "first-6", "A-from-6", "A-from-4-G-from-8", "A-limit-above"],
)
def test_statistics_and_noise_are_those_of_the_examples_used(
    limit: int | None, a_limit: int | None, used: tuple[int, int]
) -> None:
    """Each half's estimate is what a batch of that half alone gives (per-example loops);
    the noise is ``||X_1 - X_2||^2 / (2 ||X||^2)`` and ``X`` is the statistic of the
    examples used: the whole batch, or with ``statistics_examples=k`` its first ``k``
    alone, although the loss averaged all ``N``; ``A`` from at most ``a_examples`` of
    those."""
    model = _model()
    x, y = _batch()
    bruteforce = {
        n: [
            _bruteforce(model, x[rows], y[rows])
            for rows in (slice(n), slice(n // 2), slice(n // 2, n))
        ]
        for n in set(used)
    }
    opt = SPNGD(model, lr=0.0, refresh=MEASURING, statistics_examples=limit, a_examples=a_limit)
    F.cross_entropy(model(x), y).backward()
    pending = {name: block.take_pending() for name, block in opt.curvature.items()}
    for i, n in enumerate(used):
        whole, first, second = bruteforce[n]
        for name, block in opt.curvature.items():
            assert block.measure_noise
            stats, noise = pending[name], block.fresh_noise
            assert stats is not None
            torch.testing.assert_close(stats[i], whole[name][i], rtol=1e-10, atol=1e-12)
            difference = (first[name][i] - second[name][i]).square().sum()
            expected = difference / (2 * whole[name][i].square().sum())
            torch.testing.assert_close(noise[i], expected, rtol=1e-8, atol=0)


def _fresh_noise(opt: SPNGD, name: str) -> list[Tensor]:
    opt.curvature[name].take_pending()
    return opt.curvature[name].fresh_noise  # type: ignore[return-value]


def test_a_limit_at_or_above_the_batch_changes_nothing() -> None:
    x, y = _batch()
    taken = []
    for limit in (None, N, 4 * N):
        model = _model()
        opt = SPNGD(model, lr=0.0, statistics_examples=limit, a_examples=limit)
        F.cross_entropy(model(x), y).backward()
        taken.append([opt.curvature[name].take_pending() for name in ("0", "3")])
    for other in taken[1:]:
        for stats, reference in zip(other, taken[0], strict=True):
            for stat, expected in zip(stats, reference, strict=True):
                assert torch.equal(stat, expected)


def test_accumulated_micro_batches_have_a_kth_of_the_noise() -> None:
    """K micro-batches' statistics are averaged: the mean of K independent estimates has
    1/K of their mean noise, so the block reports (sum of the K noises) / K^2."""
    x, y = _batch()
    parts = (slice(0, N // 2), slice(N // 2, N))
    alone = []
    for part in parts:
        model = _model()
        opt = SPNGD(model, lr=0.0, refresh=MEASURING)
        F.cross_entropy(model(x[part]), y[part]).backward()
        alone.append(_fresh_noise(opt, "3"))
    model = _model()
    opt = SPNGD(model, lr=0.0, accumulation_steps=2, refresh=MEASURING)
    for part in parts:
        (F.cross_entropy(model(x[part]), y[part]) / 2).backward()
    together = _fresh_noise(opt, "3")
    for i in range(2):
        torch.testing.assert_close(together[i], (alone[0][i] + alone[1][i]) / 4)
        assert not torch.isclose(alone[0][i], alone[1][i])


@pytest.mark.parametrize("n", [N, N + 1])
@pytest.mark.parametrize("kind", ["conv", "conv1d", "linear"])
def test_kronecker_noise_is_the_difference_of_the_halves_estimates(kind: str, n: int) -> None:
    """Each half's A and G equal the statistic of that half with every output gradient
    scaled to the whole batch's (n / half): A does not depend on it, G twice; the whole
    batch's statistic is their mean and the noise half their squared distance. (A
    convolution's G of an even batch takes both halves from one call.)"""
    torch.manual_seed(0)
    if kind == "conv":
        block: Conv2dBlock | LinearBlock = Conv2dBlock("c", nn.Conv2d(3, 4, 3).double())
        x, g = torch.randn(n, 3, 5, 5), torch.randn(n, 4, 3, 3)
    elif kind == "conv1d":
        block = Conv1dBlock("c", nn.Conv1d(3, 4, 3).double())
        x, g = torch.randn(n, 3, 7), torch.randn(n, 4, 5)
    else:
        block = LinearBlock("l", nn.Linear(5, 4).double())
        x, g = torch.randn(n, 5), torch.randn(n, 4)
    x, g = x.double(), g.double() / n
    half = n // 2
    for index in (0, 1):
        first = block.compute_statistic(index, x[:half], g[:half] * (n / half))
        second = block.compute_statistic(index, x[half:], g[half:] * (n / (n - half)))
        stat, noise = block.statistic_and_noise(index, x, g)
        torch.testing.assert_close(stat, block.compute_statistic(index, x, g), rtol=1e-12, atol=0)
        expected = (first - second).square().sum() / (2 * stat.square().sum())
        torch.testing.assert_close(noise, expected, rtol=1e-12, atol=0)


def test_batchnorm_noise_is_the_halves_difference_with_the_whole_batch_normalisation() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).double()
    block = BatchNormBlock("bn", bn, 16.0)
    x = torch.randn(N, 4, 3, 3, dtype=torch.float64) + 2.0
    grad_output = torch.randn(N, 4, 3, 3, dtype=torch.float64) / N
    u, v = bn_uv_from_delta(bn_xhat(bn, x), N * grad_output)
    terms = torch.stack((u * u, u * v, v * v), dim=2)

    def fisher(rows: slice) -> Tensor:
        return terms[rows].mean(0)

    whole, first, second = fisher(slice(None)), fisher(slice(0, N // 2)), fisher(slice(N // 2, N))
    stat, noise = block.statistic_and_noise(0, x, grad_output)
    torch.testing.assert_close(stat, whole, rtol=1e-10, atol=0)
    torch.testing.assert_close(stat, block.compute_statistic(0, x, grad_output), rtol=0, atol=0)
    expected = (first - second).square().sum() / (2 * whole.square().sum())
    torch.testing.assert_close(noise, expected, rtol=1e-10, atol=0)


def test_batchnorm_statistics_of_the_first_examples_normalise_with_them() -> None:
    """A BatchNorm Fisher from the first ``k`` examples: per-example terms of those, with
    ``x_hat`` from their own mean and variance and ``delta`` the whole batch's, also when
    the whole batch's mean and 1/std came from the forward."""
    torch.manual_seed(0)
    k = 6
    bn = nn.BatchNorm2d(4).double()
    block = BatchNormBlock("bn", bn, 16.0)
    block.statistics_examples = k
    x = torch.randn(N, 4, 3, 3, dtype=torch.float64) + 2.0
    grad_output = torch.randn(N, 4, 3, 3, dtype=torch.float64) / N
    u, v = bn_uv_from_delta(bn_xhat(bn, x[:k]), N * grad_output[:k])
    expected = torch.stack((u * u, u * v, v * v), dim=2).mean(0)
    block.accumulate(x, grad_output, StageTimes())
    (stat,) = block.take_pending()  # type: ignore[misc]
    torch.testing.assert_close(stat, expected, rtol=1e-10, atol=0)
    whole_batch = block.forward_context(bn(x.requires_grad_()))
    assert whole_batch is not None
    block.accumulate(x.detach(), grad_output, StageTimes(), 1.0, whole_batch)
    (stat,) = block.take_pending()  # type: ignore[misc]
    torch.testing.assert_close(stat, expected, rtol=1e-10, atol=0)


def test_noise_is_measured_only_where_a_rule_reads_it() -> None:
    for kwargs, measured in (
        ({"refresh": MEASURING}, True),
        ({"stat_interval": 1}, False),
        ({"refresh": None, "stat_interval": 5}, False),
    ):
        model = _model()
        opt = SPNGD(model, lr=0.0, **kwargs)  # type: ignore[arg-type]
        assert all(block.measure_noise is measured for block in opt.curvature.values())
    for knobs in (AdaptiveRefresh(rule="threshold"), AdaptiveRefresh(alpha=-1.0)):
        opt = SPNGD(_model(), lr=0.0, refresh=knobs)
        assert not any(block.measure_noise for block in opt.curvature.values())


def test_noise_is_measured_from_the_last_warmup_steps_on() -> None:
    """The warm-up's decisions are fixed, so its early steps skip the halves; noise comes
    with every statistic from ``NOISE_LEAD_STEPS`` steps before the first decision."""
    warmup = NOISE_LEAD_STEPS + 2
    model = _model()
    opt = SPNGD(model, lr=0.01, refresh=AdaptiveRefresh(warmup_steps=warmup))
    x, y = _batch()
    measured = []
    for _ in range(warmup + 1):  # all computed: the warm-up, then the first decision
        measured.append(opt.curvature["3"].measure_noise)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        noise = opt.curvature["3"].fresh_noise
        assert all((n is not None) is measured[-1] for n in noise)
    assert measured == [False] * 2 + [True] * (NOISE_LEAD_STEPS + 1)


def test_statistics_are_timed_per_kind() -> None:
    opt = SPNGD(_model(), lr=0.0)
    times = StageTimes()
    opt.curvature["3"].accumulate(
        torch.randn(N, 100, dtype=torch.float64), torch.randn(N, 3, dtype=torch.float64), times
    )
    assert set(times.seconds) == {"statistics A", "statistics G"}
    opt.curvature["3"].to_compute = [False, True]
    opt.curvature["3"].accumulate(
        torch.randn(N, 100, dtype=torch.float64), torch.randn(N, 3, dtype=torch.float64), times
    )
    assert set(times.seconds) == {"statistics A", "statistics G"}
