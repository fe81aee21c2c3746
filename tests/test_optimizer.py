"""SPNGD as a torch optimizer: validation, describe(), groups, state, numerical safety."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spngd import SPNGD
from spngd.linalg import FactorizationError
from tests.small_models import deep_conv_bn_net


class Mixed(nn.Module):
    """One of each: supported layers and an unsupported one."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(1, 4, 3, padding=1, groups=1)
        self.bn = nn.BatchNorm2d(4)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.fc = nn.Linear(4 * 6 * 6 + 6, 3)

    def forward(self, image: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        features = self.depthwise(torch.relu(self.bn(self.conv(image)))).flatten(1)
        return self.fc(torch.cat((features, self.embed(token)), 1))


def _batch(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 1, 6, 6, generator=gen),
        torch.randint(0, 10, (n,), generator=gen),
        torch.randint(0, 3, (n,), generator=gen),
    )


def _train(model: Mixed, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    for k in range(steps):
        image, token, y = _batch(seed=seed + k)
        opt.zero_grad()
        F.cross_entropy(model(image, token), y).backward()
        opt.step()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -0.1}, "lr must be finite and >= 0"),
        ({"damping": 0.0}, "damping must be finite and > 0"),
        ({"damping": -1e-3}, "damping must be finite and > 0"),
        ({"stat_decay": 1.0}, r"stat_decay must be in \[0, 1\)"),
        ({"stat_decay": -0.5}, r"stat_decay must be in \[0, 1\)"),
        ({"fisher": "exact"}, "fisher must be one of"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\)"),
        ({"weight_decay": -1.0}, "weight_decay must be finite and >= 0"),
        ({"bn_damping_scale": 0.0}, "bn_damping_scale must be finite and > 0"),
        ({"lr": float("inf")}, "lr must be finite and >= 0, got inf"),
        ({"lr": "0.1"}, "lr must be finite and >= 0, got '0.1'"),
        ({"momentum": None}, r"momentum must be in \[0, 1\), got None"),
        ({"damping": float("nan")}, "damping must be finite and > 0, got nan"),
        ({"damping_form": "diagonal"}, "damping_form must be one of factored-keep-a"),
        ({"accumulation_steps": 0}, "accumulation_steps must be an int >= 1, got 0"),
        ({"accumulation_steps": True}, "accumulation_steps must be an int >= 1, got True"),
        ({"statistics_examples": 1}, "statistics_examples must be an int >= 2 or None, got 1"),
        ({"statistics_examples": True}, "statistics_examples must be an int >= 2 or None"),
        ({"a_examples": 0}, "a_examples must be an int >= 2 or None, got 0"),
        ({"a_patches": 0}, "a_patches must be an int >= 1 or None, got 0"),
    ],
)
def test_bad_hyperparameters_name_the_problem(kwargs: dict[str, object], message: str) -> None:
    settings = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        SPNGD(Mixed(), **settings)  # type: ignore[arg-type]


def test_parameters_instead_of_model_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="needs the model"):
        SPNGD(Mixed().parameters(), lr=0.1)  # type: ignore[arg-type]


def test_parametrized_and_pruned_layers_get_momentum_sgd_and_train() -> None:
    """weight_norm, spectral_norm and pruning compute a layer's weight from other tensors:
    its statistics do not describe their gradients, so the layer gets momentum SGD and the
    rest keeps its curvature."""
    from torch.nn.utils import parametrizations, prune

    torch.manual_seed(0)
    model = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(10, 20)),
        nn.Tanh(),
        parametrizations.spectral_norm(nn.Linear(20, 20)),
        nn.Tanh(),
        nn.Linear(20, 20),
        nn.Linear(20, 3),
    )
    prune.l1_unstructured(model[4], "weight", 0.5)
    opt = SPNGD(model, lr=0.1)
    described = opt.describe()
    assert described["0"] == "momentum SGD (ParametrizedLinear's weight is parametrized or pruned)"
    assert described["2"] == "momentum SGD (ParametrizedLinear's weight is parametrized or pruned)"
    assert described["4"] == "momentum SGD (Linear's weight is parametrized or pruned)"
    assert described["5"] == "K-FAC Linear: A 21x21, G 3x3"
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and opt.curvature["5"].ready


def test_an_unbatched_conv_input_is_recorded_as_a_batch_of_one() -> None:
    """Conv2d and Conv1d take ``(C, H, W)`` and ``(C, L)`` without a batch dimension; the
    statistics are those of the same input as a batch of one."""
    for conv, shape in ((nn.Conv2d(3, 4, 3), (3, 6, 6)), (nn.Conv1d(3, 4, 3), (3, 6))):
        torch.manual_seed(0)
        unbatched = nn.Sequential(conv, nn.Flatten(0), nn.LazyLinear(3))
        unbatched(torch.randn(shape))
        batched = copy.deepcopy(unbatched)
        batched[1] = nn.Flatten(1)
        x, y = torch.randn(shape), torch.tensor(1)
        opts = [SPNGD(net, lr=0.1, stat_interval=1) for net in (unbatched, batched)]
        for net, opt, inputs, target in (
            (unbatched, opts[0], x, y),
            (batched, opts[1], x[None], y[None]),
        ):
            F.cross_entropy(net(inputs), target).backward()
            opt.step()
        for a, b in zip(
            opts[0].curvature["0"].factors, opts[1].curvature["0"].factors, strict=True
        ):
            torch.testing.assert_close(a, b)
        for a, b in zip(unbatched.parameters(), batched.parameters(), strict=True):
            torch.testing.assert_close(a, b)


def test_a_layer_whose_module_is_never_called_is_named_once() -> None:
    """MultiheadAttention multiplies by ``out_proj.weight`` without calling ``out_proj``:
    the layer has gradients but no statistics, so it gets the plain gradient, and one
    warning says so (the layers that are called keep their curvature)."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            return self.head(self.attn(h, h, h)[0].mean(1))

    torch.manual_seed(0)
    model = Attention()
    opt = SPNGD(model, lr=0.1)
    x, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert [str(w.message) for w in caught] == [
        "SPNGD: 'attn.out_proj' has gradients but records no statistics: its weight is used "
        "without calling the module (as MultiheadAttention does with out_proj); it gets the "
        "plain gradient"
    ]
    assert opt.curvature["embed"].ready and opt.curvature["head"].ready


def test_model_without_supported_layers_warns_and_acts_as_sgd() -> None:
    model = nn.Sequential(nn.Embedding(5, 3))
    supported = r"\(Linear, Conv2d, Conv1d, BatchNorm\)"
    with pytest.warns(
        UserWarning, match=f"no trainable layer of a kind it preconditions {supported}"
    ):
        opt = SPNGD(model, lr=0.1)
    assert opt.describe() == {"0": "momentum SGD (Embedding is not supported)"}


def test_describe_says_how_each_module_is_preconditioned() -> None:
    model = Mixed()
    lines = SPNGD(model, lr=0.1).describe()
    assert lines == {
        "embed": "momentum SGD (Embedding is not supported)",
        "conv": "K-FAC Conv2d: A 10x10, G 4x4",
        "bn": "unit-wise BatchNorm: 4 channels x 2x2 Fisher (damping x16)",
        "depthwise": "K-FAC Conv2d: A 9x9, G 1x1 per group x 4 groups",
        "fc": "K-FAC Linear: A 151x151, G 3x3",
    }
    model.conv.bias.requires_grad_(False)
    model.bn.requires_grad_(False)
    lines = SPNGD(model, lr=0.1).describe()
    assert lines["conv"] == "momentum SGD (Conv2d is only partly trainable)"
    assert "bn" not in lines


def test_unsupported_parameters_follow_torch_sgd_exactly() -> None:
    torch.manual_seed(0)
    model = Mixed()
    shadow = model.embed.weight.detach().clone().requires_grad_()
    opt = SPNGD(model, lr=0.05, momentum=0.9, weight_decay=1e-2)
    sgd = torch.optim.SGD([shadow], lr=0.05, momentum=0.9, weight_decay=1e-2)
    for k in range(4):
        image, token, y = _batch(seed=k)
        opt.zero_grad()
        F.cross_entropy(model(image, token), y).backward()
        shadow.grad = model.embed.weight.grad.clone()
        opt.step()
        sgd.step()
    torch.testing.assert_close(model.embed.weight, shadow)


def test_one_layer_in_groups_with_different_damping_is_rejected() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    groups = [
        {"params": [model[0].weight], "damping": 1e-3},
        {"params": [model[0].bias], "damping": 1e-1},
    ]
    with pytest.raises(ValueError, match="different damping or weight_decay"):
        SPNGD(model, lr=0.1, params=groups)


def test_a_param_group_added_after_construction_is_refused_and_changes_nothing() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[1].requires_grad_(False)
    opt = SPNGD(model, lr=0.1)
    model[1].requires_grad_(True)  # unfrozen later, as when fine-tuning
    with pytest.raises(ValueError, match="cannot take param groups afterwards"):
        opt.add_param_group({"params": list(model[1].parameters())})
    assert [len(g["params"]) for g in opt.param_groups] == [2]
    assert list(opt.describe()) == ["0"]


def test_param_groups_carry_their_own_learning_rate() -> None:
    torch.manual_seed(0)
    model = Mixed()
    others = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    opt = SPNGD(
        model, lr=0.1, params=[{"params": others}, {"params": model.fc.parameters(), "lr": 0.0}]
    )
    before = model.fc.weight.clone()
    _train(model, opt, 2)
    torch.testing.assert_close(model.fc.weight, before)
    assert opt.param_groups[1]["lr"] == 0.0


@pytest.mark.parametrize("stat_decay", [0.0, 0.9])
def test_state_dict_round_trip_continues_identically(stat_decay: float) -> None:
    """Saved inside the adaptive rule's warm-up and past it (pooled statistics, intervals,
    formed inverses in use), a resumed optimizer takes the same steps bit for bit."""
    torch.manual_seed(0)
    model = Mixed()
    opt = SPNGD(model, lr=0.05, stat_decay=stat_decay)
    for done, more in ((3, 2), (9, 16)):
        _train(model, opt, done, seed=10 * done)
        resumed_model = copy.deepcopy(model)
        resumed = SPNGD(resumed_model, lr=0.05, stat_decay=stat_decay)
        resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
        skipped = opt.refresh_counts()["total"]["stats_skipped"]
        _train(model, opt, more, seed=100)
        _train(resumed_model, resumed, more, seed=100)
        for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
            assert torch.equal(a, b)
    assert opt.refresh_counts()["total"]["stats_skipped"] > skipped


def test_mc_sampling_state_from_another_kind_of_generator_draws_afresh_with_a_warning() -> None:
    """A CUDA generator's state (16 bytes of Philox seed and offset) does not fit a CPU
    generator (and the other way round): the labels are drawn afresh, with one warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = SPNGD(model, lr=0.1, fisher="mc")
    state = opt.state_dict()
    state["mc_generator"] = torch.arange(16, dtype=torch.uint8)
    with pytest.warns(RuntimeWarning, match="MC sampling state comes from a GPU generator"):
        opt.load_state_dict(state)
    labels = opt.sample_fisher(model(torch.randn(64, 4)))
    assert labels.shape == (64,) and int(labels.max()) < 3


def test_a_state_dict_holding_another_inverse_form_is_recomputed_not_misread() -> None:
    """A block's saved inverse is read only under the name of the form it keeps: explicit
    inverses of the Kronecker factors saved where Cholesky factors are kept (or an entry
    saved without its form's name) are dropped and recomputed from the saved factors."""
    torch.manual_seed(0)
    model = Mixed()
    opt = SPNGD(model, lr=0.05, stat_interval=2)
    _train(model, opt, 1)
    state = copy.deepcopy(opt.state_dict())
    old = state["curvature"]["conv"]
    old["inverse_form_name"] = "inverse"
    old["inverse_form"] = tuple(torch.cholesky_inverse(lower) for lower in old["inverse_form"])
    resumed_model = copy.deepcopy(model)
    resumed = SPNGD(resumed_model, lr=0.05, stat_interval=2)
    resumed.load_state_dict(state)
    assert resumed.curvature["conv"].inverse_form is None
    assert resumed.curvature["fc"].inverse_form is not None
    unnamed = copy.deepcopy(state)
    del unnamed["curvature"]["fc"]["inverse_form_name"]
    loaded = SPNGD(copy.deepcopy(model), lr=0.05, stat_interval=2)
    loaded.load_state_dict(unnamed)
    assert loaded.curvature["fc"].inverse_form is None and loaded.curvature["fc"].ready
    # step 1 computes no statistics: the original reuses its inverse, the resumed one
    # recomputes the same from the saved factors
    _train(model, opt, 1, seed=100)
    _train(resumed_model, resumed, 1, seed=100)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_zero_grad_also_drops_pending_statistics() -> None:
    model = Mixed()
    opt = SPNGD(model, lr=0.1)
    image, token, y = _batch()
    F.cross_entropy(model(image, token), y).backward()
    assert opt.curvature["fc"].has_pending
    opt.zero_grad()
    assert not any(block.has_pending for block in opt.curvature.values())


def test_nonfinite_statistics_keep_the_previous_inverse_with_one_warning() -> None:
    torch.manual_seed(0)
    model = Mixed()
    opt = SPNGD(model, lr=0.05)
    _train(model, opt, 1)
    block = opt.curvature["conv"]
    kept_factors, kept_inverse = list(block.factors), block.inverse_form
    poisoned = (torch.full((1, 10, 10), float("nan")), torch.full((1, 4, 4), float("inf")))
    block.compute_statistic = lambda i, x, g, context=None: poisoned[i]  # type: ignore[method-assign]
    with pytest.warns(RuntimeWarning, match="'conv' contain NaN or inf") as caught:
        _train(model, opt, 3, seed=10)
    assert sum("'conv'" in str(w.message) for w in caught) == 1
    assert all(got is kept for got, kept in zip(block.factors, kept_factors, strict=True))
    assert block.inverse_form is kept_inverse
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _break_inversion(block: object) -> None:
    """Make every inversion path of a Kronecker block fail (batched and single)."""

    def fail(damping: float) -> tuple[torch.Tensor, ...]:
        raise FactorizationError("injected")

    def nan_factors(damping: float) -> tuple[torch.Tensor, ...]:
        return tuple(torch.full_like(f, float("nan")) for f in block.factors)  # type: ignore[attr-defined]

    block.compute_inverse = fail  # type: ignore[attr-defined]
    block.damped_factors = nan_factors  # type: ignore[attr-defined]


def _heal_inversion(block: object) -> None:
    del block.compute_inverse  # type: ignore[attr-defined]
    del block.damped_factors  # type: ignore[attr-defined]


def test_failed_inversion_keeps_the_previous_inverse_or_uses_the_gradient() -> None:
    torch.manual_seed(0)
    model = Mixed()
    opt = SPNGD(model, lr=0.05, momentum=0.0, stat_interval=1)
    block = opt.curvature["fc"]
    _break_inversion(block)
    image, token, y = _batch()
    before = model.fc.weight.detach().clone()
    F.cross_entropy(model(image, token), y).backward()
    grad = model.fc.weight.grad.clone()
    with pytest.warns(RuntimeWarning, match="could not invert the curvature of 'fc'"):
        opt.step()
    # no inverse yet: the plain gradient is used
    torch.testing.assert_close(model.fc.weight, before - 0.05 * grad)
    _heal_inversion(block)
    _train(model, opt, 1, seed=5)
    good = block.inverse_form
    _break_inversion(block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(model, opt, 2, seed=6)
    assert block.inverse_form is good
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_mc_sampling_from_a_diverged_model_skips_the_step() -> None:
    """NaN logits (a diverged run) sample labels all the same; the step is then skipped
    like any step with NaN gradients, instead of torch.multinomial stopping the run."""
    model = Mixed()
    opt = SPNGD(model, lr=0.1, fisher="mc", max_bad_steps=2)
    start = [p.detach().clone() for p in model.parameters()]
    image, token, y = _batch()
    logits = model(image, token) * float("nan")
    labels = opt.sample_fisher(logits)
    assert labels.shape == y.shape and int(labels.max()) < logits.shape[1]
    F.cross_entropy(logits, y).backward()
    with pytest.warns(RuntimeWarning, match="NaN or inf gradient; step skipped"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True))


def test_sparse_gradients_are_refused_by_name() -> None:
    model = nn.Sequential(nn.Embedding(20, 8, sparse=True), nn.Flatten(), nn.Linear(24, 5))
    opt = SPNGD(model, lr=0.1)
    F.cross_entropy(model(torch.randint(0, 20, (4, 3))), torch.randint(0, 5, (4,))).backward()
    with pytest.raises(RuntimeError, match="SPNGD does not support sparse gradients"):
        opt.step()


def test_mc_without_sampling_warns_and_sampling_needs_mc() -> None:
    model = Mixed()
    opt = SPNGD(model, lr=0.1, fisher="mc")
    with pytest.warns(RuntimeWarning, match=r"call opt.sample_fisher\(logits\)"):
        _train(model, opt, 1)
    emp = SPNGD(Mixed(), lr=0.1)
    with pytest.raises(RuntimeError, match="sample_fisher\\(\\) is for fisher='mc'"):
        emp.sample_fisher(torch.zeros(2, 3, requires_grad=True))


def _linear_step(opt: SPNGD, model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_stat_decay_weights_the_old_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    opt = SPNGD(model, lr=0.0, stat_decay=0.75)
    x1, x2 = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    _linear_step(opt, model, x1, y)
    first = opt.curvature["<model>"].A.clone()
    fresh = SPNGD(copy.deepcopy(model), lr=0.0)
    _linear_step(fresh, fresh.curvature["<model>"].module, x2, y)  # type: ignore[arg-type]
    _linear_step(opt, model, x2, y)
    expected = 0.75 * first + 0.25 * fresh.curvature["<model>"].A
    torch.testing.assert_close(opt.curvature["<model>"].A, expected)


def test_weight_decay_is_added_before_preconditioning_and_floors_the_damping() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    before = model.weight.detach().clone(), model.bias.detach().clone()
    opt = SPNGD(model, lr=1.0, momentum=0.0, damping=1e-4, weight_decay=1e-2)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    _linear_step(opt, model, x, y)
    block = opt.curvature["<model>"]
    grad = torch.cat((model.weight.grad, model.bias.grad[:, None]), 1)
    grad = grad + 1e-2 * torch.cat((before[0], before[1][:, None]), 1)
    A, G = block.A[0], block.G[0]
    pi = ((A.trace() / 5) / (G.trace() / 3)).sqrt()
    lam = 1e-2  # max(damping, weight_decay)
    a_d = A + pi * lam**0.5 * torch.eye(5, dtype=torch.float64)
    g_d = G + lam**0.5 / pi * torch.eye(3, dtype=torch.float64)
    expected = torch.linalg.solve(g_d, grad) @ torch.linalg.inv(a_d)
    torch.testing.assert_close(before[0] - model.weight, expected[:, :4])
    torch.testing.assert_close(before[1] - model.bias, expected[:, 4])


def test_each_group_damps_and_decays_its_own_layers() -> None:
    """Two layers in groups with their own damping and weight decay: each layer's update is
    the brute-force solve with its own group's values (damping floored at the decay)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    settings = {"0": (1e-4, 1e-2), "2": (3e-1, 1e-3)}  # damping, weight decay: lam 1e-2, 3e-1
    groups = [
        {"params": model[int(name)].parameters(), "damping": damping, "weight_decay": decay}
        for name, (damping, decay) in settings.items()
    ]
    before = {name: copy.deepcopy(model[int(name)]) for name in settings}
    opt = SPNGD(model, lr=1.0, momentum=0.0, params=groups)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for name, (damping, decay) in settings.items():
        layer, old, block = model[int(name)], before[name], opt.curvature[name]
        grad = torch.cat((layer.weight.grad, layer.bias.grad[:, None]), 1)
        grad = grad + decay * torch.cat((old.weight, old.bias[:, None]), 1)
        A, G = block.A[0], block.G[0]
        a_dim, g_dim = A.shape[0], G.shape[0]
        pi = ((A.trace() / a_dim) / (G.trace() / g_dim)).sqrt()
        lam = max(damping, decay)
        a_d = A + pi * lam**0.5 * torch.eye(a_dim, dtype=torch.float64)
        g_d = G + lam**0.5 / pi * torch.eye(g_dim, dtype=torch.float64)
        expected = torch.linalg.solve(g_d, grad) @ torch.linalg.inv(a_d)
        torch.testing.assert_close(old.weight - layer.weight, expected[:, :-1])
        torch.testing.assert_close(old.bias - layer.bias, expected[:, -1])


def test_step_with_a_closure_returns_its_loss_and_takes_the_same_steps() -> None:
    torch.manual_seed(0)
    model = Mixed()
    twin = copy.deepcopy(model)
    opt, twin_opt = SPNGD(model, lr=0.05), SPNGD(twin, lr=0.05)

    def closure_on(batch: tuple[torch.Tensor, ...]) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            twin_opt.zero_grad()
            loss = F.cross_entropy(twin(*batch[:2]), batch[2])
            loss.backward()
            return loss

        return closure

    for k in range(12):  # past the warm-up, so that some statistics are skipped
        batch = _batch(seed=k)
        opt.zero_grad()
        loss = F.cross_entropy(model(*batch[:2]), batch[2])
        loss.backward()
        opt.step()
        assert torch.equal(twin_opt.step(closure_on(batch)), loss)
    assert opt.refresh_counts()["total"]["stats_skipped"] > 0
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_nonfinite_gradient_skips_the_step_and_too_many_stop_training() -> None:
    from spngd import NonFiniteGradientError

    torch.manual_seed(0)
    model = Mixed()
    opt = SPNGD(model, lr=0.05, max_bad_steps=3, stat_interval=1)
    _train(model, opt, 2)
    params = [p.detach().clone() for p in model.parameters()]
    factors = [f.clone() for f in opt.curvature["conv"].factors]
    momentum = opt.state[model.fc.weight]["momentum_buffer"].clone()
    step = opt.steps_taken
    for attempt in (1, 2):
        image, token, y = _batch(seed=50 + attempt)
        opt.zero_grad()
        F.cross_entropy(model(image, token), y).backward()
        model.fc.weight.grad[0, 0] = float("nan")
        with pytest.warns(RuntimeWarning, match=f"step skipped \\({attempt} in a row"):
            opt.step()
    for before, after in zip(params, model.parameters(), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    for before, after in zip(factors, opt.curvature["conv"].factors, strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(opt.state[model.fc.weight]["momentum_buffer"], momentum)
    assert opt.steps_taken == step and opt.skipped_steps == 2
    _train(model, opt, 1, seed=60)  # a good step resets the run of bad ones
    assert not opt.last_step_skipped and opt.skipped_steps == 2
    image, token, y = _batch(seed=70)
    with pytest.raises(NonFiniteGradientError, match="3 steps in a row had NaN or inf"):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(image * float("inf"), token), y).backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()


def test_a_step_reads_the_device_once_whatever_the_number_of_layers() -> None:
    """Refresh and non-refresh steps alike: nothing read during backward, one read (all the
    step's checks together) per ``step()``, for 14 and 26 blocks."""
    from tests.host_reads import counting_host_reads

    for pairs in (6, 12):
        model = deep_conv_bn_net(pairs)
        opt = SPNGD(model, lr=0.05)
        assert len(opt.curvature) == 2 * pairs + 2
        gen = torch.Generator().manual_seed(1)
        for _ in range(12):
            x = torch.randn(16, 3, 6, 6, generator=gen)
            y = torch.randint(0, 3, (16,), generator=gen)
            opt.zero_grad()
            with counting_host_reads() as backward_reads:
                F.cross_entropy(model(x), y).backward()
            with counting_host_reads() as step_reads:
                opt.step()
            assert backward_reads == [] and len(step_reads) == 1, (backward_reads, step_reads)
        counts = opt.refresh_counts()["total"]
        assert counts["stats_computed"] > 0 and counts["stats_skipped"] > 0


def test_a_state_dict_of_a_model_with_other_layer_sizes_is_refused_and_changes_nothing() -> None:
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    wide = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))  # same names
    opts = {}
    for name, model in (("small", small), ("wide", wide)):
        opts[name] = SPNGD(model, lr=0.1)
        x = torch.randn(8, model[0].in_features)
        opts[name].zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 3, (8,))).backward()
        opts[name].step()
    before = copy.deepcopy(opts["wide"].state_dict())
    with pytest.raises(
        ValueError, match=r"saved A of '0' has shape \(1, 5, 5\); this layer's is \(1, 7, 7\)"
    ):
        opts["wide"].load_state_dict(opts["small"].state_dict())
    state = opts["small"].state_dict()
    del state["curvature"]
    with pytest.raises(ValueError, match=r"saved momentum of parameter 0 has shape \(5, 4\)"):
        opts["wide"].load_state_dict(state)
    after = opts["wide"].state_dict()
    assert after["step"] == before["step"]
    for a, b in zip(_flat(after), _flat(before), strict=True):
        assert torch.equal(a, b)


def _flat(state: object) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _flat(state[key])]
    if isinstance(state, list | tuple):
        return [t for item in state for t in _flat(item)]
    return []


def test_a_state_dict_with_a_bad_hyperparameter_is_refused_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = Mixed()
    opt = SPNGD(model, lr=0.05)
    _train(model, opt, 2)
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0]["damping"] = -1.0
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"damping must be finite and > 0, got -1.0"):
        opt.load_state_dict(state)
    state["param_groups"][0].update(damping=1e-3, lr="fast")
    with pytest.raises(ValueError, match=r"lr must be finite and >= 0, got 'fast'"):
        opt.load_state_dict(state)
    assert opt.state_dict()["param_groups"] == before["param_groups"]


def test_a_state_dict_that_is_not_spngd_s_is_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = SPNGD(model, lr=0.1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(ValueError, match="not an SPNGD state dict: its param groups lack"):
        opt.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="not an optimizer state dict"):
        opt.load_state_dict({})
    assert opt.param_groups[0]["lr"] == 0.1


def test_an_empty_batch_records_nothing_and_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = SPNGD(model, lr=0.1)
    opt.zero_grad()
    model(torch.randn(0, 4)).sum().backward()
    opt.step()
    assert all(block.factors == [None, None] for block in opt.curvature.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
