"""The adapter contract, per method, against independent computations."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_gpt2, tiny_llama
from sara_cli.adapters.registry import METHODS, MoSaraLayer, SaraLayer, SorsaLayer
from sara_cli.adapters.inject import adapter_layers, count_parameters, inject_adapters, is_adapter_parameter

OPTIONS = {
    "sara": {"tau": 0.5},
    "mosara": {"tau": 0.5, "num_experts": 3},
    "lora": {"rank": 4, "alpha": 8},
    "pissa": {"rank": 4},
    "sorsa": {"rank": 4},
}
ZERO_INIT = {"sara", "mosara", "lora"}  # exactly unchanged; pissa/sorsa up to rounding
TARGETS = "q_proj,v_proj"


def adapted(method, model=None, targets=TARGETS, **extra):
    model = model if model is not None else tiny_llama()
    inject_adapters(model, method, {**OPTIONS[method], **extra}, targets)
    return model


def batch(vocab=1024, shape=(2, 9)):
    return torch.randint(4, vocab, shape, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def perturb(model, scale=0.05):
    gen = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if is_adapter_parameter(name):
            p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_output_unchanged_at_init(method):
    ids = batch()
    with torch.no_grad():
        before = tiny_llama()(ids).logits
        after = adapted(method)(ids).logits
    if method in ZERO_INIT:
        assert torch.equal(before, after)
    else:
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"mosara"}))
def test_merged_equals_unmerged_and_unmerge_restores(method):
    model = adapted(method)
    perturb(model)
    ids = batch()
    layers = adapter_layers(model)
    weights = {n: layer.base_weight().clone() for n, layer in layers.items()}
    with torch.no_grad():
        unmerged = model(ids).logits
        for layer in layers.values():
            layer.merge()
        merged = model(ids).logits
        for name, layer in layers.items():
            assert not torch.equal(layer.base_weight(), weights[name])
            layer.unmerge()
            torch.testing.assert_close(layer.base_weight(), weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def expected_count(method, out_features, in_features, rank, m=3):
    return {
        "lora": rank * (in_features + out_features),
        "pissa": rank * (in_features + out_features),
        "sorsa": rank * (in_features + out_features) + rank,
        "sara": rank * (in_features + out_features) + rank,
        "mosara": m * rank + rank + m + out_features,
    }[method]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_parameter_count_and_only_adapters_train(method):
    model = adapted(method)
    layers = adapter_layers(model)
    formula = sum(expected_count(method, l.out_features, l.in_features, l.rank())
                  for l in layers.values())
    trainable, _ = count_parameters(model)
    assert trainable == formula
    for name, p in model.named_parameters():
        assert p.requires_grad == is_adapter_parameter(name), name
        if p.requires_grad:
            assert p.dtype == torch.float32


def test_mosara_v_before_count():
    model = adapted("mosara", v_position="before")
    layers = adapter_layers(model).values()
    formula = sum(3 * l.k + l.k + 3 + l.in_features for l in layers)
    assert count_parameters(model)[0] == formula


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_step_moves_adapters_and_keeps_base(method):
    model = adapted(method).train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch()
    for _ in range(2):  # two steps: zero-init factors only get a gradient on the second
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    moved = [n for n, p in model.named_parameters() if n in adapter and not torch.equal(p, adapter[n])]
    assert len(moved) == len(adapter)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_base_keeps_dtype(method):
    model = tiny_llama().to(torch.bfloat16)
    adapted(method, model)
    for layer in adapter_layers(model).values():
        assert layer.base_layer.weight.dtype == torch.bfloat16
    for name, p in model.named_parameters():
        if is_adapter_parameter(name):
            assert p.dtype == torch.float32
    with torch.no_grad():
        logits = model(batch()).logits
    assert logits.dtype == torch.bfloat16


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gpt2_conv1d(method):
    ids = batch()
    plain = tiny_gpt2()
    model = adapted(method, tiny_gpt2(), targets="c_attn,c_fc")
    layers = adapter_layers(model)
    assert len(layers) == 4
    for layer in layers.values():
        assert layer.fan_in_fan_out
        assert layer.base_weight().shape == (layer.out_features, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=0)
        if method != "mosara":
            perturb(model)
            unmerged = model(ids).logits
            for layer in layers.values():
                layer.merge()
            torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


# -- against hand computations in numpy float64 ---------------------------------------------------

def linear(out_features=6, in_features=5, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def test_sara_forward_matches_numpy():
    layer = SaraLayer(linear(), tau=0.5)
    with torch.no_grad():
        layer.sara_lambda.copy_(torch.linspace(0.5, 1.5, layer.k))
    x = torch.randn(3, 5)
    W, b = (t.detach().double().numpy() for t in (layer.base_layer.weight, layer.base_layer.bias))
    U, lam, Vh = (t.detach().double().numpy() for t in (layer.sara_U, layer.sara_lambda, layer.sara_Vh))
    xn = x.double().numpy()
    expected = xn @ W.T + b + ((xn @ Vh.T) * lam) @ U.T
    np.testing.assert_allclose(layer(x).detach().double().numpy(), expected, atol=1e-5)
    # the update has rank <= k
    assert np.linalg.matrix_rank(layer.delta_weight().detach().double().numpy(), tol=1e-6) <= layer.k


def test_sara_k_follows_the_rule():
    base = linear(12, 10)
    s = np.linalg.svd(base.weight.detach().double().numpy(), compute_uv=False)
    expected = int(np.argmax(np.cumsum(s) >= 0.3 * s.sum())) + 1
    assert SaraLayer(base, tau=0.3).k == expected


def test_mosara_m1_forward_matches_numpy():
    base = linear(6, 5)
    layer = MoSaraLayer(base, tau=0.6, num_experts=1)
    with torch.no_grad():
        layer.mosara_v.copy_(torch.linspace(-1, 1, 6))
    x = torch.randn(4, 5)
    W, b = (t.detach().double().numpy() for t in (base.weight, base.bias))
    U, Vh = layer.mosara_U.double().numpy(), layer.mosara_Vh.double().numpy()
    lam = layer.mosara_lambda.detach().double().numpy()[0]  # m = 1: the gate is 1
    v = layer.mosara_v.detach().double().numpy()
    xn = x.double().numpy()
    expected = xn @ W.T + b + (((xn @ Vh.T) * lam) @ U.T) * v
    np.testing.assert_allclose(layer(x).detach().double().numpy(), expected, atol=1e-5)
    # the frozen vectors are W's top-k singular vectors
    Un, s, Vhn = np.linalg.svd(W)
    k = layer.k
    np.testing.assert_allclose(np.abs(U.T @ Un[:, :k]), np.eye(k), atol=1e-5)


def test_mosara_gates_sum_to_one_and_are_recorded():
    layer = MoSaraLayer(linear(8, 7), tau=0.5, num_experts=4)
    layer.record_gates = True
    layer(torch.randn(2, 3, 7))
    (g,) = layer.recorded_gates
    assert g.shape == (2, 3, 4)
    torch.testing.assert_close(g.sum(-1), torch.ones(2, 3))
    layer.record_gates = False
    layer(torch.randn(2, 3, 7))
    assert len(layer.recorded_gates) == 1


def test_mosara_mixture_equals_sum_over_experts():
    """The paper's form sum_i g_i (x U Lam_i V v), computed expert by expert in numpy."""
    layer = MoSaraLayer(linear(8, 7), tau=0.5, num_experts=3)
    with torch.no_grad():
        layer.mosara_v.normal_()
    x = torch.randn(5, 7)
    xn = x.double().numpy()
    U, Vh = layer.mosara_U.double().numpy(), layer.mosara_Vh.double().numpy()
    Lam = layer.mosara_lambda.detach().double().numpy()
    v = layer.mosara_v.detach().double().numpy()
    z = xn @ Vh.T
    logits = (z @ layer.mosara_router_in.detach().double().numpy()) @ layer.mosara_router_out.detach().double().numpy()
    g = np.exp(logits - logits.max(-1, keepdims=True))
    g /= g.sum(-1, keepdims=True)
    branch = sum(g[:, [i]] * (((z * Lam[i]) @ U.T) * v) for i in range(3))
    np.testing.assert_allclose(layer.branch(x).detach().double().numpy(), branch, atol=1e-5)


def test_mosara_cost_does_not_grow_with_experts():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(16, 64)
    flops = {}
    for m in (1, 9):
        layer = MoSaraLayer(linear(64, 64), rank=8, num_experts=m)
        with FlopCounterMode(display=False) as counter:
            layer.branch(x)
        flops[m] = counter.get_total_flops()
    # the two rank-k products cost 2 * 16 * 8 * 64 each; m only enters the routing and the
    # mixing g Lam, 2 * 16 * m * (8 + 1) flops
    assert flops[9] - flops[1] == 2 * 16 * 8 * (8 + 1)


def test_sorsa_regulariser_gradient_matches_autograd():
    layer = SorsaLayer(linear(9, 7), rank=3)
    with torch.no_grad():
        layer.sorsa_U.add_(torch.randn_like(layer.sorsa_U) * 0.1)
        layer.sorsa_Vh.add_(torch.randn_like(layer.sorsa_Vh) * 0.1)
    U = layer.sorsa_U.detach().double().requires_grad_()
    Vh = layer.sorsa_Vh.detach().double().requires_grad_()
    eye = torch.eye(3, dtype=torch.float64)
    loss = torch.linalg.norm(U.T @ U - eye) + torch.linalg.norm(Vh @ Vh.T - eye)
    loss.backward()
    gamma = 0.01
    expected_U = (U - gamma * U.grad).detach()
    expected_Vh = (Vh - gamma * Vh.grad).detach()
    layer.orthonormal_step(gamma)
    torch.testing.assert_close(layer.sorsa_U.double(), expected_U, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.sorsa_Vh.double(), expected_Vh, atol=1e-6, rtol=0)


def numpy_adamw_reference_steps(params, loss_grads, steps, lr, gamma, max_norm, wd, layers):
    """SORSA's reference rule by hand (float64 numpy): clip the loss gradient to max_norm, add
    (gamma / lr) * grad of L_reg = mean over the 2L factors of ||M||_F, then torch's AdamW.

    params: {name: array}, names "i.U", "i.S", "i.Vh" for layer i; loss_grads: {name: array}.
    """
    b1, b2, eps = 0.9, 0.999, 1e-8
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t in range(1, steps + 1):
        total = math.sqrt(sum(float((g ** 2).sum()) for g in loss_grads.values()))
        coef = min(1.0, max_norm / (total + 1e-6))  # torch.nn.utils.clip_grad_norm_
        g = {k: loss_grads[k] * coef for k in p}
        for i in range(layers):
            U, Vh = p[f"{i}.U"], p[f"{i}.Vh"]  # (out, r), (r, in)
            M_U, M_Vh = U.T @ U - np.eye(U.shape[1]), Vh @ Vh.T - np.eye(Vh.shape[0])  # (r, r)
            scale = (gamma / lr) / (2 * layers)
            g[f"{i}.U"] = g[f"{i}.U"] + scale * 2 * U @ M_U / np.linalg.norm(M_U)
            g[f"{i}.Vh"] = g[f"{i}.Vh"] + scale * 2 * M_Vh @ Vh / np.linalg.norm(M_Vh)
        for k in p:
            p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - b1 ** t), v2[k] / (1 - b2 ** t)
            p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("gamma", [0.0, 0.05])
def test_sorsa_reference_rule_equals_a_hand_computed_adamw_step(gamma):
    """Two AdamW steps on two tiny SORSA layers in float64, with a fixed linear loss, against
    numpy; the regulariser is large enough to change the update (the gamma = 0 case differs)."""
    from types import SimpleNamespace

    from sara_cli.training.train import SorsaCallback

    torch.manual_seed(3)
    layers = [SorsaLayer(linear(6, 5), rank=3).double() for _ in range(2)]
    names = {}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.sorsa_U.add_(torch.randn_like(layer.sorsa_U) * 0.2)
            layer.sorsa_Vh.add_(torch.randn_like(layer.sorsa_Vh) * 0.2)
            names.update({f"{i}.U": layer.sorsa_U, f"{i}.S": layer.sorsa_S, f"{i}.Vh": layer.sorsa_Vh})
    gen = torch.Generator().manual_seed(4)
    coefficients = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in names.items()}
    start = {k: p.detach().numpy().copy() for k, p in names.items()}
    lr, max_norm, wd = 1e-2, 0.5, 0.01
    optimizer = torch.optim.AdamW(list(names.values()), lr=lr, weight_decay=wd)
    callback = SorsaCallback(layers, gamma=gamma, update="reference")
    for _ in range(2):
        optimizer.zero_grad()
        sum((coefficients[k] * p).sum() for k, p in names.items()).backward()  # grad = coefficients
        torch.nn.utils.clip_grad_norm_(list(names.values()), max_norm)  # the Trainer clips first
        callback.on_pre_optimizer_step(SimpleNamespace(learning_rate=lr), None, None)
        optimizer.step()
    expected = numpy_adamw_reference_steps(start, {k: c.numpy() for k, c in coefficients.items()}, 2,
                                           lr, gamma, max_norm, wd, len(layers))
    for k, p in names.items():
        np.testing.assert_allclose(p.detach().numpy(), expected[k], rtol=0, atol=1e-12, err_msg=k)
    without = numpy_adamw_reference_steps(start, {k: c.numpy() for k, c in coefficients.items()}, 2,
                                          lr, 0.0, max_norm, wd, len(layers))
    moved = max(float(np.abs(expected[k] - without[k]).max()) for k in names)
    assert (moved > 1e-3) == (gamma > 0)


def test_sara_random_lambda_is_kaiming_uniform_with_fan_in_k():
    layer = SaraLayer(linear(64, 48), rank=40, init_lambda="random")
    lam = layer.sara_lambda.detach().double().numpy()  # (k,)
    bound = 1 / math.sqrt(40)
    assert np.all(np.abs(lam) <= bound) and np.abs(lam).max() > 0.8 * bound  # U(-1/sqrt(k), 1/sqrt(k))
    assert abs(lam.mean()) < 0.3 * bound
    x = torch.randn(3, 48)
    assert not torch.allclose(layer(x), layer.base_layer(x))  # the paper-literal reading changes the model
    with pytest.raises(ValueError, match="init_lambda"):
        SaraLayer(linear(), rank=2, init_lambda="gaussian")


def test_mosara_router_starts_as_the_papers_two_linear_layers():
    """W_g1 (k, 1) and W_g2 (1, m) are drawn as nn.Linear(k, 1) and nn.Linear(1, m) draw their
    weights (transposed): Kaiming uniform with fan-ins k and 1, bounds 1/sqrt(k) and 1."""
    from sara_cli.adapters.base import kaiming_uniform

    k, m = 37, 5
    torch.manual_seed(11)
    first = nn.Linear(k, 1, bias=False).weight.detach().T  # (k, 1)
    second = nn.Linear(1, m, bias=False).weight.detach().T  # (1, m)
    torch.manual_seed(11)
    torch.testing.assert_close(kaiming_uniform((k, 1), "cpu", fan_in=k), first, rtol=0, atol=0)
    torch.testing.assert_close(kaiming_uniform((1, m), "cpu", fan_in=1), second, rtol=0, atol=0)
    layer = MoSaraLayer(linear(64, 64), rank=k, num_experts=m)
    assert float(layer.mosara_router_in.abs().max()) <= 1 / math.sqrt(k)
    assert float(layer.mosara_router_out.abs().max()) <= 1.0
    assert float(layer.mosara_router_in.abs().max()) > 0.5 / math.sqrt(k)


def test_pissa_factors_are_the_principal_part():
    base = linear(10, 8)
    W = base.weight.detach().double().numpy().copy()
    from sara_cli.adapters.registry import PissaLayer

    layer = PissaLayer(base, rank=2, svd="full")
    U, s, Vh = np.linalg.svd(W)
    principal = (U[:, :2] * s[:2]) @ Vh[:2]
    BA = (layer.pissa_B @ layer.pissa_A).detach().double().numpy()
    np.testing.assert_allclose(BA, principal, atol=1e-5)
    np.testing.assert_allclose(layer.base_weight().detach().double().numpy(), W - principal, atol=1e-5)


def test_lora_scaling_and_init():
    from sara_cli.adapters.registry import LoraLayer

    layer = LoraLayer(linear(6, 5), rank=2, alpha=6)
    assert layer.scaling == 3.0
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(5)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 5
    assert float(layer.lora_A.detach().abs().max()) <= bound


def mosara_numpy(layer, x: torch.Tensor) -> np.ndarray:
    """The routed Mo-SARA layer (v after) in float64 numpy, from its parameters."""
    t = {name: p.detach().double().numpy() for name, p in layer.named_parameters()} | {
        name: b.double().numpy() for name, b in layer.named_buffers()}
    xn = x.double().numpy()
    z = xn @ t["mosara_Vh"].T  # (..., k)
    logits = (z @ t["mosara_router_in"]) @ t["mosara_router_out"]
    g = np.exp(logits - logits.max(-1, keepdims=True))
    g /= g.sum(-1, keepdims=True)
    return xn @ t["base_layer.weight"].T + t["base_layer.bias"] + ((z * (g @ t["mosara_lambda"])) @ t["mosara_U"].T) * t["mosara_v"]


def test_mosara_inference_path_matches_numpy_and_follows_edits():
    layer = MoSaraLayer(linear(8, 7), tau=0.5, num_experts=3).eval()
    with torch.no_grad():
        layer.mosara_v.normal_()
    x = torch.randn(2, 5, 7)
    with torch.inference_mode():
        np.testing.assert_allclose(layer(x).double().numpy(), mosara_numpy(layer, x), atol=1e-5)
    assert layer._inference is not None  # the folded path ran
    with torch.no_grad():  # an in-place edit, then a replaced parameter: both are seen
        layer.mosara_lambda.mul_(-2.0)
        layer.mosara_router_out.add_(3.0)
    with torch.inference_mode():
        np.testing.assert_allclose(layer(x).double().numpy(), mosara_numpy(layer, x), atol=1e-5)
    layer.mosara_v = nn.Parameter(torch.randn(8))
    with torch.inference_mode():
        np.testing.assert_allclose(layer(x).double().numpy(), mosara_numpy(layer, x), atol=1e-5)


def test_mosara_inference_path_is_not_taken_when_training_or_recording():
    layer = MoSaraLayer(linear(8, 7), tau=0.5, num_experts=3)
    x = torch.randn(4, 7)
    layer(x).sum().backward()  # training mode with autograd
    assert layer._inference is None and layer.mosara_v.grad is not None
    layer.eval()
    layer.record_gates = True
    with torch.no_grad():
        layer(x)
    assert layer._inference is None and len(layer.recorded_gates) == 1


def test_mosara_inference_path_on_a_bfloat16_base_matches_the_training_path():
    base = linear(8, 7).to(torch.bfloat16)
    layer = MoSaraLayer(base, tau=0.5, num_experts=3).eval()
    with torch.no_grad():
        layer.mosara_v.normal_()
    x = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    with torch.inference_mode():
        fast = layer(x)
        layer.fast_inference = False
        reference = layer(x)
    assert fast.dtype == torch.bfloat16 and layer._inference is not None
    # both add an fp32 branch cast once to bf16: they differ by at most a bf16 rounding step
    torch.testing.assert_close(fast, reference, rtol=1e-2, atol=1e-2)
