"""When to recompute statistics and inverses: SP-NGD's adaptive frequency, or fixed intervals.

Adaptive (the paper's "stale statistics"): every statistic key (a layer's ``A``, ``G``, or
BatchNorm ``F``) has an interval. At a refresh step the fresh estimate ``X_new`` is compared
with the statistic in use ``X`` by ``d = ||X_new - X||_F / max(||X||_F, 1e-12)``; a
*similar* estimate grows the interval (``double`` or ``plus1``, capped at ``max_interval``),
any other shrinks it (``halve`` or ``reset`` to 1). The next refresh is ``interval`` steps
later (after a pooled statistic's change, the next step: see ``pool``). The first
``warmup_steps`` steps always refresh. ``alpha < 0`` refreshes every step; ``alpha = inf``
grows every interval to the cap.

``halve`` is the default: where a statistic's noise dominates its changes (``G`` and
BatchNorm ``F`` at the batches one machine runs), one estimate in several lands past the
rule's bound by chance; from an interval of 32, ``reset`` then computes it five times
in the next 32 steps (after 1, 3, 7, 15 and 31) and ``halve`` once (with ``pool``, the
next step's estimate replaces the statistic either way); a drift that persists still
brings the interval down to 1 within ``log2(max_interval)`` refreshes. On ResNet-20 past
the warm-up ``halve`` computed a third to two thirds fewer statistics and half the
inversion time, and it took the steps to 97% of ``reset`` over ten seeds of ResNet-20 on
the digits and 20 of ``resnet8-1d`` on mnist1d at batches 128 and 512
(docs/performance.md has the tables).

What counts as similar is the ``rule``:

- ``"noise"`` (default): ``d^2 <= alpha^2 + (noise_margin * s)^2``, where ``s^2`` is the
  key's *sampling noise*: the expected ``d^2`` between two independent estimates from
  batches of the same weights. Each block measures it whenever it computes the statistic
  (from :data:`NOISE_LEAD_STEPS` steps before the warm-up ends), from the two halves of
  its batch (their difference holds no drift; see
  :meth:`spngd.curvature.base.CurvatureBlock.statistic_and_noise`), and the rule keeps a
  running mean over refreshes. A statistic is then recomputed when it has drifted by more
  than ``alpha`` beyond its noise, not when one batch happens to differ from the last:
  replacing a stale estimate by a fresh one that is no closer to the truth buys nothing.
  At the batch sizes one machine runs, ``G`` and BatchNorm ``F`` differ by 20-60% between
  two batches of the same weights (``benchmarks/statistics_drift.py``), so the ``"threshold"``
  rule below recomputes them on nearly every step.
  ``noise_margin = 1`` and ``warmup_steps = 10`` were chosen on
  ``benchmarks/steps_to_accuracy.py`` (ResNet-20, the digits at batch 1,024, ten seeds;
  docs/performance.md has the tables): a margin of 1 took 0.99x the steps to 97% of
  every-step refresh, 1.5 took 1.05x, and a cap of 8 instead of 32 did not change the
  steps. Where runs reach the target within about ten steps, 3 warm-up steps took 1.26x
  the steps of every-step refresh and 10 took 0.95x, with 31-49% of the statistics
  computed over 88 steps: early in training the weights move too fast for intervals to
  grow.
- ``"threshold"``: ``d <= alpha``, comparing raw per-batch estimates (the paper's stale
  statistics as they are commonly read); it suits batches so large
  that their noise is far below ``alpha`` (the paper's 32,768 and more).

What a fresh estimate does to the statistic in use ``X``: with ``pool`` (the default),
while the changes count as small ``X`` is the mean of the estimates since the last change
that did not (a fresh one joins with weight ``1 / (n + 1)``, at least ``1 /``
:data:`MAX_POOLED`), so the statistic a long interval keeps is not one batch's noise but
the mean of several; a change that does not count as small restarts the pool, and the next
step's estimate replaces ``X``. The change is measured against the pooled ``X``, whose
noise is below one estimate's: the noise rule's ``s^2`` then leaves a little more room for
drift. The warm-up's estimates replace ``X``. Without ``pool`` (as under the ``"threshold"``
rule's reading of the paper) each fresh estimate replaces ``X``. With ``stat_decay > 0``
the running average replaces both. On mnist1d at batch 128 (ten seeds,
``benchmarks/batch_scaling.py``'s runs) pooling took a median 72 steps to 97% where the
latest estimate took 87 and every-step refresh 84.5; on the digits at batch 1,024 it took
the latest estimate's steps on nine seeds of ten (docs/performance.md).

A layer's inverse is recomputed when any of its statistics was refreshed (pi couples the
two Kronecker factors) or its damping changed. Fixed mode (``stat_interval=k``) computes
all statistics every ``k`` steps and inverses every ``inverse_interval`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

import torch

from spngd.settings import InvalidSettingError, Rule, check, optional_int_rule, setting

Key = tuple[str, int]
"""A statistic: (layer name, index of the statistic within the layer's block)."""


GROW_RULES = ("double", "plus1")
SHRINK_RULES = ("halve", "reset")
RULES = ("noise", "threshold")

NOISE_WEIGHT = 0.3
"""Weight of a new measurement in the running mean of a key's sampling noise: about the
last three count, so the estimate follows the phase of training without being moved much
by one odd batch."""


MAX_POOLED = 8
"""The most estimates a pooled statistic weighs alike; later ones join with weight 1/8, so
over a long run of small changes the statistic follows the last few refreshes (about
eight) rather than every estimate since the warm-up."""


NOISE_LEAD_STEPS = round(1 / NOISE_WEIGHT)
"""Warm-up steps before the first decision in which the statistics' noise is measured:
about as many measurements as the running mean weighs, so the first decision reads a mean
of recent noise. The earlier warm-up steps skip the cost (measuring from the two halves of
the batch costs up to 1.4x the statistic alone); their measurements, of weights far from
the first decision's, would have weighed about a quarter in its mean."""


INTERVAL_RULES: dict[str, Rule] = dict.fromkeys(
    ("stat_interval", "inverse_interval"), optional_int_rule(1)
)
"""The rule of SPNGD's fixed intervals (None: adaptive, or with the statistics)."""


def check_intervals(stat_interval: int | None, inverse_interval: int | None) -> None:
    """An :class:`~spngd.settings.InvalidSettingError` for a bad interval, or for an
    ``inverse_interval`` under the adaptive rule (whose inverses follow the refreshed
    statistics)."""
    check(
        "SPNGD",
        {"stat_interval": stat_interval, "inverse_interval": inverse_interval},
        INTERVAL_RULES,
    )
    if inverse_interval is not None and stat_interval is None:
        raise InvalidSettingError(
            "SPNGD", "inverse_interval", "None without a fixed stat interval", inverse_interval
        )


_RULES: dict[str, Rule] = {
    "alpha": (lambda v: not math.isnan(v), "a number"),
    "rule": (lambda v: v in RULES, " or ".join(RULES)),
    "noise_margin": (lambda v: v >= 0.0, ">= 0"),
    "grow": (lambda v: v in GROW_RULES, " or ".join(GROW_RULES)),
    "shrink": (lambda v: v in SHRINK_RULES, " or ".join(SHRINK_RULES)),
    "max_interval": (lambda v: v >= 1, "a positive integer"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "pool": (lambda v: isinstance(v, bool), "True or False"),
}


@dataclass(frozen=True, kw_only=True)
class AdaptiveRefresh:
    """Knobs of the adaptive rule (the module docstring says what each does); a bad value
    is an :class:`~spngd.settings.InvalidSettingError`."""

    alpha: float = setting(
        0.1,
        "threshold on a statistic's relative change d; its interval grows while d is small "
        "(see rule; negative: every step)",
    )
    rule: Literal["noise", "threshold"] = setting(
        "noise",
        "when d counts as small, 'noise': d^2 <= alpha^2 + (noise_margin * s)^2 with s the "
        "statistic's measured batch-to-batch noise, 'threshold': d <= alpha",
    )
    noise_margin: float = setting(1.0, "rule 'noise': the margin, in units of the noise")
    grow: Literal["double", "plus1"] = setting("double", "interval growth: double or plus1")
    shrink: Literal["halve", "reset"] = setting(
        "halve", "interval shrink on a change that is not small: halve or reset (to 1)"
    )
    max_interval: int = setting(32, "longest interval in steps")
    warmup_steps: int = setting(10, "first steps that always refresh")
    pool: bool = setting(
        True,
        "while a statistic's changes count as small, use the mean of its estimates since "
        "the last larger change (without it: the latest estimate)",
    )

    def __post_init__(self) -> None:
        check("AdaptiveRefresh", {f.name: getattr(self, f.name) for f in fields(self)}, _RULES)

    def similar(self, change: float, noise: float) -> bool:
        """Whether a relative change ``change`` lets the interval grow, for a key whose
        measured sampling noise (expected ``d^2`` between two batches) is ``noise``."""
        if self.alpha < 0.0:
            return False
        if self.rule == "threshold":
            return change <= self.alpha
        return change * change <= self.alpha**2 + self.noise_margin**2 * noise

    def grown(self, interval: int) -> int:
        return min(2 * interval if self.grow == "double" else interval + 1, self.max_interval)

    def shrunk(self, interval: int) -> int:
        return 1 if self.shrink == "reset" else max(1, interval // 2)


def relative_changes(
    references: list[torch.Tensor], fresh: list[torch.Tensor]
) -> list[torch.Tensor]:
    """``||fresh - reference||_F / max(||reference||_F, 1e-12)`` for each pair, as 0-dim
    tensors (read them together: one host sync for all). Fused over the list: two
    ``foreach`` norms and one ``foreach`` difference, whatever the number of pairs."""
    if not references:
        return []
    differences = torch._foreach_sub(fresh, references)
    changes = torch._foreach_div(
        torch._foreach_norm(differences),
        torch._foreach_clamp_min(torch._foreach_norm(references), 1e-12),
    )
    return list(changes)


class RefreshPolicy:
    """Decides, per statistic key and step, whether to compute; counts what was done.

    Under torch.distributed a layer's keys are observed and decided by the rank that owns
    the layer, which sends the decisions with its results; other ranks' copies of them
    (loaded from a checkpoint) go stale, so the state is read per owner (:meth:`state_dict`).
    """

    def __init__(
        self,
        stat_interval: int | None,
        inverse_interval: int | None,
        adaptive: AdaptiveRefresh,
    ) -> None:
        check_intervals(stat_interval, inverse_interval)
        self.stat_interval = stat_interval
        self.inverse_interval = inverse_interval
        self.adaptive = adaptive
        self.interval: dict[Key, int] = {}
        self.next_step: dict[Key, int] = {}
        self.noise: dict[Key, float] = {}
        """Each key's sampling noise (expected ``d^2`` between two batches), running mean."""
        self.pooled: dict[Key, int] = {}
        """How many estimates each key's statistic in use averages (``pool``); 0 or absent:
        the next estimate replaces it."""
        self.counts: dict[str, dict[str, int]] = {}

    @property
    def is_adaptive(self) -> bool:
        return self.stat_interval is None

    @property
    def uses_noise(self) -> bool:
        """Whether decisions read the statistics' sampling noise (so blocks measure it, see
        :meth:`measures_noise`)."""
        knobs = self.adaptive
        return (
            self.is_adaptive
            and knobs.rule == "noise"
            and knobs.noise_margin > 0.0
            and 0.0 <= knobs.alpha < math.inf
        )

    def measures_noise(self, step: int) -> bool:
        """Whether the statistics computed at ``step`` come with their sampling noise:
        under the noise rule, from :data:`NOISE_LEAD_STEPS` steps before the warm-up ends."""
        return self.uses_noise and step >= self.adaptive.warmup_steps - NOISE_LEAD_STEPS

    def reads_changes(self, step: int) -> bool:
        """Whether :meth:`observe` at ``step`` reads the statistics' changes: only the
        adaptive rule does, and only past its warm-up (so the changes are not computed
        at the other steps)."""
        return self.is_adaptive and step >= self.adaptive.warmup_steps

    def is_due(self, key: Key, step: int) -> bool:
        """Whether statistic ``key`` is computed at optimizer step ``step``."""
        if not self.is_adaptive:
            return step % self.stat_interval == 0  # type: ignore[operator]
        return step < self.adaptive.warmup_steps or step >= self.next_step.get(key, 0)

    def fresh_weight(self, key: Key) -> float:
        """The share of a fresh estimate of ``key`` in the statistic it updates: ``1 / (n + 1)``
        while the statistic in use averages ``n`` estimates (adaptive, ``pool``), else 1."""
        if not (self.is_adaptive and self.adaptive.pool):
            return 1.0
        return 1.0 / (self.pooled.get(key, 0) + 1)

    def observe(self, key: Key, step: int, change: float | None, noise: float | None) -> None:
        """Adapt ``key``'s interval after computing it at ``step``; ``change`` is the
        relative change against the value in use (None when there was none), ``noise``
        the fresh estimate's measured sampling noise (None when not measured)."""
        if not self.is_adaptive:
            return
        if noise is not None:
            mean = self.noise.get(key)
            self.noise[key] = noise if mean is None else mean + NOISE_WEIGHT * (noise - mean)
        interval, pooled, next_step = self.interval.get(key, 1), 0, None
        if change is not None and self.reads_changes(step):
            similar = self.adaptive.similar(change, self.noise.get(key, 0.0))
            interval = self.adaptive.grown(interval) if similar else self.adaptive.shrunk(interval)
            if similar and self.adaptive.pool:
                pooled = min(self.pooled.get(key, 0) + 1, MAX_POOLED - 1)
            elif self.fresh_weight(key) < 1.0:
                # The estimate that showed the change joined the pool as one of several:
                # the next step's estimate replaces the mixture.
                next_step = step + 1
        self.interval[key] = interval
        self.pooled[key] = pooled
        self.next_step[key] = step + interval if next_step is None else next_step

    def inverse_due(self, step: int, refreshed: bool) -> bool:
        """Whether a layer whose statistics were (not) refreshed at ``step`` re-inverts."""
        if self.inverse_interval is None:
            return refreshed
        return step % self.inverse_interval == 0

    def count(self, layer: str, what: str, done: bool) -> None:
        """Tally one computation of ``what`` (``stats``, ``inverses``, or one statistic's
        name such as ``A``) as done or skipped."""
        counts = self.counts.setdefault(layer, dict.fromkeys(COUNTERS, 0))
        counts.setdefault(f"{what}_computed", 0)
        counts.setdefault(f"{what}_skipped", 0)
        counts[f"{what}_{'computed' if done else 'skipped'}"] += 1

    @staticmethod
    def summarize(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        """Per layer and ``"total"``: statistics (all, and per statistic name) and inverses
        computed and skipped."""
        report = {layer: dict(c) for layer, c in counts.items()}
        names = dict.fromkeys(COUNTERS)
        for c in counts.values():
            names.update(dict.fromkeys(c))
        report["total"] = {name: sum(c.get(name, 0) for c in counts.values()) for name in names}
        return report

    def state_dict(self, layers: Callable[[str], bool] = lambda layer: True) -> dict[str, object]:
        """The policy's state for the layers ``layers`` accepts (under torch.distributed,
        the ones this rank owns: only their owner keeps a layer's state up to date)."""
        keyed = {
            name: {key: value for key, value in entries.items() if layers(key[0])}
            for name, entries in (
                ("interval", self.interval),
                ("next_step", self.next_step),
                ("noise", self.noise),
                ("pooled", self.pooled),
            )
        }
        return {**keyed, "counts": self.counts_of(layers)}

    def counts_of(self, layers: Callable[[str], bool]) -> dict[str, dict[str, int]]:
        """The counts of the layers ``layers`` accepts (see :meth:`state_dict`)."""
        return {layer: dict(c) for layer, c in self.counts.items() if layers(layer)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.interval = dict(state["interval"])  # type: ignore[call-overload]
        self.next_step = dict(state["next_step"])  # type: ignore[call-overload]
        # A state without it measures each key's noise again at its next refresh.
        self.noise = dict(state.get("noise", {}))  # type: ignore[call-overload]
        # A state without it takes each key's next estimate as it is.
        self.pooled = dict(state.get("pooled", {}))  # type: ignore[call-overload]
        self.counts = {layer: dict(c) for layer, c in state["counts"].items()}  # type: ignore[attr-defined]


COUNTERS = ("stats_computed", "stats_skipped", "inverses_computed", "inverses_skipped")


def computed_shares(counts: dict[str, int]) -> dict[str, float]:
    """From one layer's (or the total's) counts of :meth:`SPNGD.stats`, the share computed
    of all statistics (``stats``), of each statistic by name (``A``, ``G``, ``F``) and of
    the inverses, e.g. ``{"stats": 0.9, "A": 0.6, "G": 1.0, "inverses": 1.0}``."""
    shares = {}
    for key, done in counts.items():
        what, _, outcome = key.rpartition("_")
        total = done + counts.get(f"{what}_skipped", 0)
        if outcome == "computed" and total:
            shares[what] = done / total
    return shares
