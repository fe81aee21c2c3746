"""Brute-force checks of the Conv1d KFC block: factors and update from explicit 1-D patches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from tests.curvature._bruteforce import (
    FACTOR_TOL,
    UPDATE_TOL,
    assert_rel_close,
    kron_solve,
    make_opt,
    param_change,
    per_example_layer_data,
    reference_grads,
    rel_err,
    snapshot,
)

N = 5
LENGTH = 11
N_CLS = 3
LAM = 0.1

# (C_in, C_out, groups, kernel, stride, padding, dilation, padding_mode)
CONFIGS = [
    (3, 4, 1, 3, 2, 1, 2, "zeros"),
    (4, 6, 2, 3, 1, 1, 1, "zeros"),
    (3, 6, 3, 5, 2, 0, 1, "zeros"),
    (2, 4, 1, 4, 1, "same", 1, "zeros"),
    (2, 3, 1, 3, 1, 2, 1, "reflect"),
    (2, 3, 1, 3, 1, "same", 2, "circular"),
]
CONFIG_IDS = ["strided-dilated", "groups2", "depthwise-k5", "same-even", "reflect", "same-circular"]

# torch says that 'same' padding of an even kernel copies the input: true, and not our concern
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def _model(config: tuple, bias: bool) -> nn.Sequential:
    cin, cout, groups, kernel, stride, padding, dilation, mode = config
    torch.manual_seed(0)
    conv = nn.Conv1d(
        cin,
        cout,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=mode,
    )
    length = conv(torch.zeros(1, cin, LENGTH)).shape[-1]
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(cout * length, N_CLS)).double()


def _batch(cin: int) -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    return torch.randn(N, cin, LENGTH, dtype=torch.float64), torch.randint(0, N_CLS, (N,))


def _padded(conv: nn.Conv1d, x_i: Tensor) -> Tensor:
    """One example ``(C, L)`` with the convolution's padding applied along the length."""
    kernel, dilation = conv.kernel_size[0], conv.dilation[0]
    if conv.padding == "same":
        total = dilation * (kernel - 1)
        left, right = total // 2, total - total // 2
    else:
        left = right = conv.padding[0]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x_i[None], (left, right), mode=mode)[0]


def _patches(conv: nn.Conv1d, x_i: Tensor, group: int) -> Tensor:
    """Columns ``(C_in/groups * k [+1], L_out)``: entry ``(c, j)`` of column ``t`` is the
    padded input of channel ``c`` at ``t * stride + j * dilation``."""
    cin_g = conv.in_channels // conv.groups
    x = _padded(conv, x_i)[group * cin_g : (group + 1) * cin_g]
    kernel, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    out_length = (x.shape[1] - dilation * (kernel - 1) - 1) // stride + 1
    columns = []
    for t in range(out_length):
        column = [x[c, t * stride + j * dilation] for c in range(cin_g) for j in range(kernel)]
        if conv.bias is not None:
            column.append(x.new_ones(()))
        columns.append(torch.stack(column))
    return torch.stack(columns, dim=1)


def _weight_matrix(conv: nn.Conv1d, group: int, w: Tensor, b: Tensor | None) -> Tensor:
    per_group = conv.out_channels // conv.groups
    rows = slice(group * per_group, (group + 1) * per_group)
    matrix = w[rows].reshape(w[rows].shape[0], -1)
    return matrix if b is None else torch.cat((matrix, b[rows, None]), dim=1)


def _factors(conv: nn.Conv1d, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per group ``A = (1/n) sum_{i,t} a a^T`` and ``G = (1/(n |T|)) sum_{i,t} g g^T``."""
    data = per_example_layer_data(model, conv, x, y)
    cout_g = conv.out_channels // conv.groups
    a_list, g_list = [], []
    for group in range(conv.groups):
        A = G = 0.0
        for i in range(N):
            columns = _patches(conv, data.a[i], group)
            g = data.g[i, group * cout_g : (group + 1) * cout_g]
            assert g.shape[1] == columns.shape[1]
            A = A + columns @ columns.T
            G = G + g @ g.T / columns.shape[1]
        a_list.append(A / N)
        g_list.append(G / N)
    return torch.stack(a_list), torch.stack(g_list)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_patches_reproduce_the_convolution(config: tuple, bias: bool) -> None:
    """Sanity of the brute force: ``W_g @ patches`` is the layer's output."""
    model = _model(config, bias)
    conv = model[0]
    x, _ = _batch(config[0])
    with torch.no_grad():
        out = conv(x)
    cout_g = conv.out_channels // conv.groups
    for group in range(conv.groups):
        W = _weight_matrix(conv, group, conv.weight.detach(), conv.bias)
        for i in range(N):
            expected = out[i, group * cout_g : (group + 1) * cout_g]
            assert rel_err(W.detach() @ _patches(conv, x[i], group), expected) < 1e-12


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_conv1d_factors_and_update_match_bruteforce(config: tuple, bias: bool) -> None:
    """A and G per group equal the explicit sums, and the update of the convolution is
    ``solve(kron(G_d, A_d), vec(grad))`` per group, pi-damped."""
    model = _model(config, bias)
    conv = copy.deepcopy(model)[0]
    x, y = _batch(config[0])
    ref = copy.deepcopy(model)
    A, G = _factors(ref[0], ref, x, y)
    grads = reference_grads(ref, x, y)

    opt = make_opt(model, damping=LAM)
    assert opt.curvature["0"].method == "K-FAC Conv1d"
    before = snapshot(model)
    opt.zero_grad()
    cross_entropy(model(x), y).backward()
    opt.step()
    assert_rel_close(opt.curvature["0"].A, A, FACTOR_TOL, "conv1d.A")
    assert_rel_close(opt.curvature["0"].G, G, FACTOR_TOL, "conv1d.G")

    change = param_change(before, model)
    for group in range(conv.groups):
        gradient = _weight_matrix(conv, group, grads["0.weight"], grads.get("0.bias"))
        expected = kron_solve(A[group], G[group], gradient, LAM)
        actual = _weight_matrix(conv, group, change["0.weight"], change.get("0.bias"))
        assert_rel_close(actual, expected, UPDATE_TOL, f"conv1d update, group {group}")


def test_describe_names_conv1d() -> None:
    model = _model(CONFIGS[1], bias=True)
    described = make_opt(model, damping=LAM).describe()
    assert described["0"] == "K-FAC Conv1d: A 7x7, G 3x3 per group x 2 groups"
