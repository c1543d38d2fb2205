"""Capping hooks against a plain reference implementation, on tiny models of three families."""

from __future__ import annotations

import itertools

import pytest
import torch

from axiscap.steering import AssistantAxis, AxisHooks, cap, decoder_layers, record_layer_outputs

from .conftest import tiny_model

FAMILIES = ["llama", "qwen3", "gemma2"]
CAP_LAYERS = [1, 2]
MONITOR = 2


def reference_cap(h: torch.Tensor, axis: torch.Tensor, tau: float) -> torch.Tensor:
    """The paper's formula written out element by element, nothing shared with the library."""
    v = axis / torch.sqrt((axis * axis).sum())
    out = h.clone()
    for idx in itertools.product(*(range(n) for n in h.shape[:-1])):
        p = float((h[idx] * v).sum())
        out[idx] = h[idx] - v * min(p - tau, 0.0)
    return out


def make_axis(model, seed=1) -> AssistantAxis:
    """A random axis whose thresholds sit at the median projection, so the cap bites often."""
    g = torch.Generator().manual_seed(seed)
    n_layers, hidden = len(decoder_layers(model)), model.config.hidden_size
    raw = torch.randn(n_layers, hidden, generator=g)
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=g)
    with torch.no_grad(), record_layer_outputs(model, CAP_LAYERS) as seen:
        model(input_ids=ids)
    taus = [float((seen[l][0].float() @ (raw[l] / raw[l].norm())).median()) for l in CAP_LAYERS]
    return AssistantAxis(raw, CAP_LAYERS, taus, MONITOR, "tiny", 25.0, 30)


def capped_reference_forward(model, axis: AssistantAxis, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the model with the reference cap applied at every capped layer."""
    layers = decoder_layers(model)

    def make(l):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            new = reference_cap(h, axis.axis[l], axis.threshold(l))
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    handles = [layers[l].register_forward_hook(make(l)) for l in axis.cap_layers]
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def hooked_forward(model, axis: AssistantAxis, ids: torch.Tensor, mask: torch.Tensor | None):
    """Logits with AxisHooks attached and the given cap mask, and the hooks (removed again)."""
    hooks = AxisHooks(model, axis)
    try:
        hooks.set_cap_mask(mask)
        with torch.no_grad():
            return model(input_ids=ids).logits, hooks
    finally:
        hooks.remove()


def test_cap_formula_matches_reference():
    g = torch.Generator().manual_seed(0)
    h, raw = torch.randn(4, 7, 16, generator=g), torch.randn(16, generator=g)
    v = raw / raw.norm()
    tau = 0.3
    out = cap(h, v, tau)
    torch.testing.assert_close(out, reference_cap(h, raw, tau))
    proj_before, proj_after = h @ v, out @ v
    below = proj_before < tau
    assert below.any() and (~below).any()
    torch.testing.assert_close(proj_after[below], torch.full_like(proj_after[below], tau))
    # Above the floor nothing moves, and nothing moves orthogonal to v anywhere.
    assert torch.equal(out[~below], h[~below])
    torch.testing.assert_close(out - (out @ v).unsqueeze(-1) * v, h - proj_before.unsqueeze(-1) * v)


def test_cap_is_idempotent():
    g = torch.Generator().manual_seed(3)
    h, raw = torch.randn(2, 5, 16, generator=g), torch.randn(16, generator=g)
    v = raw / raw.norm()
    once = cap(h, v, 0.1)
    torch.testing.assert_close(cap(once, v, 0.1), once)


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_match_reference_when_all_rows_capped(family):
    model = tiny_model(family)
    axis = make_axis(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    expected = capped_reference_forward(model, axis, ids)
    plain = model(input_ids=ids).logits.detach()
    got, hooks = hooked_forward(model, axis, ids, torch.ones(2, 1, dtype=torch.bool))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3), "the cap never bit: the test would prove nothing"
    assert hooks.cap_hits.sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_rows_off_are_bit_identical_and_rows_on_are_capped(family):
    model = tiny_model(family)
    axis = make_axis(model)
    ids = torch.randint(0, model.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    mixed, _ = hooked_forward(model, axis, ids, torch.tensor([[True], [False], [True], [False]]))
    assert torch.equal(mixed[1], plain[1]) and torch.equal(mixed[3], plain[3])
    capped = capped_reference_forward(model, axis, ids)
    torch.testing.assert_close(mixed[0], capped[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[2], capped[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_projection_after_cap_is_at_least_tau_at_every_capped_layer(family):
    model = tiny_model(family)
    axis = make_axis(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(11))
    with record_layer_outputs(model, CAP_LAYERS) as before:  # registered first: sees pre-cap outputs
        hooks = AxisHooks(model, axis)
        with record_layer_outputs(model, CAP_LAYERS) as after:
            hooks.set_cap_mask(torch.ones(3, 1, dtype=torch.bool))
            with torch.no_grad():
                model(input_ids=ids)
        hooks.remove()
    for l in CAP_LAYERS:
        v, tau = axis.unit(l), axis.threshold(l)
        pre, post = before[l][0] @ v, after[l][0] @ v
        assert (pre < tau - 1e-3).any(), f"layer {l}: no projection below tau, the test proves nothing"
        assert (post >= tau - 1e-4).all(), f"layer {l}: min post-cap projection {post.min():.4f} < tau {tau:.4f}"
    # The monitor projection is read before the monitor layer's own cap.
    torch.testing.assert_close(hooks.monitor_projection, before[MONITOR][0] @ axis.unit(MONITOR))
    # cap_hits counts exactly the positions below tau at each capped layer.
    expected_hits = [int((before[l][0] @ axis.unit(l) < axis.threshold(l)).sum()) for l in CAP_LAYERS]
    assert hooks.cap_hits.tolist() == expected_hits


def llama_case(shape: tuple[int, int], seed: int):
    """A tiny Llama, its axis, random ids of ``shape`` and the unhooked logits."""
    model = tiny_model("llama")
    axis = make_axis(model)
    ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model, axis, ids, model(input_ids=ids).logits


def test_per_position_mask_caps_only_masked_positions():
    model, axis, ids, plain = llama_case((1, 6), seed=2)
    partial, _ = hooked_forward(model, axis, ids, torch.tensor([[False, False, False, True, True, True]]))
    # Causal attention: positions before the first capped one cannot see any change.
    assert torch.equal(partial[0, :3], plain[0, :3])
    assert not torch.allclose(partial[0, 3:], plain[0, 3:], atol=1e-4)


def test_no_mask_means_no_capping_but_still_monitors():
    model, axis, ids, plain = llama_case((2, 5), seed=4)
    out, hooks = hooked_forward(model, axis, ids, None)
    assert torch.equal(out, plain)
    assert hooks.monitor_projection.shape == (2, 5)
    assert hooks.cap_hits.sum() == 0


def test_capping_runs_in_the_activation_dtype_and_projects_in_float32():
    model = tiny_model("llama").to(torch.bfloat16)
    axis = make_axis(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(6))
    with record_layer_outputs(model, [axis.monitor_layer]) as before_cap:  # registered first: sees the input
        hooks = AxisHooks(model, axis)
        hooks.set_cap_mask(torch.ones(2, 1, dtype=torch.bool))
        with record_layer_outputs(model, CAP_LAYERS) as seen:  # registered after the caps: sees their output
            with torch.no_grad():
                logits = model(input_ids=ids).logits
        hooks.remove()
    assert logits.dtype == torch.bfloat16 and hooks.monitor_projection.dtype == torch.float32
    exact = before_cap[axis.monitor_layer][0].float() @ axis.unit(axis.monitor_layer)
    assert torch.allclose(hooks.monitor_projection, exact, rtol=1e-5, atol=1e-5)
    assert hooks.cap_hits.sum() > 0
    for l in CAP_LAYERS:
        post = seen[l][0].float() @ axis.unit(l)
        assert seen[l][0].dtype == torch.bfloat16
        assert (post >= axis.threshold(l) - 0.05 * max(1.0, abs(axis.threshold(l)))).all()  # bf16 rounding


def test_split_residual_cap_caps_the_sum_and_keeps_vllms_split():
    from torch import nn

    from axiscap.steering.split_residual import install_split_residual_caps

    class SplitLayer(nn.Module):  # vLLM's contract: the stream after the layer is hidden + residual
        def forward(self, positions, hidden, residual):
            return hidden * 2, residual + 1

    g = torch.Generator().manual_seed(7)
    axis = AssistantAxis(torch.randn(4, 16, generator=g), [1, 2], [0.3, -0.2], 1, "tiny", 25.0, 1)
    layers = nn.ModuleList([SplitLayer() for _ in range(4)])
    state = install_split_residual_caps(layers, axis, range(4), 8, torch.device("cpu"), torch.float32)
    state.mask[:6] = torch.tensor([1.0, 1, 1, 0, 0, 0])  # rows 0-2 ask for capping; 6, 7 are padding
    hidden, residual = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)

    out_hidden, out_residual = layers[1](None, hidden, residual)
    stream = hidden * 2 + (residual + 1)
    assert torch.equal(out_hidden, hidden * 2)  # the correction goes on the residual only
    want = reference_cap(stream[:3], axis.axis[1], 0.3)
    assert torch.allclose((out_hidden + out_residual)[:3], want, atol=1e-5)
    assert torch.equal(out_residual[3:], residual[3:] + 1)  # capping off: untouched, value for value
    projections = stream @ axis.unit(1)
    assert torch.allclose(state.projections[:6], projections, atol=1e-5)  # monitor: before its cap
    assert state.hits[0] == (projections[:3] < 0.3).sum() > 0
    assert state.hits[1] == 0  # layer 2 has not run
    assert not isinstance(layers[0], type(layers[1]))  # layers neither capped nor monitored stay as they were


def test_retargeted_split_residual_caps_act_as_a_fresh_install_of_the_new_axis():
    """The calibration sweep's vLLM path: one retargetable install, then another axis's band, tau and
    vectors copied into its buffers, must cap exactly as an install of that axis would."""
    from torch import nn

    from axiscap.steering.split_residual import install_split_residual_caps, retarget_split_residual_caps

    class SplitLayer(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, positions, hidden, residual):
            return hidden * self.scale, residual + self.scale

    def stack():
        return nn.ModuleList([SplitLayer(1 + i / 4) for i in range(6)])

    def run(layers, state, hidden, residual):
        state.hits.zero_()
        for layer in layers:
            hidden, residual = layer(None, hidden, residual)
        return hidden + residual, state.projections[:hidden.shape[0]].clone()

    g = torch.Generator().manual_seed(11)
    first = AssistantAxis(torch.randn(6, 16, generator=g), [1, 2], [0.3, -0.2], 4, "tiny", 25.0, 1)
    second = AssistantAxis(torch.randn(6, 16, generator=g), [3, 4], [2.0, 1.5], 3, "tiny", 5.0, 1)
    hidden, residual = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    mask = torch.tensor([1.0, 1, 0, 1, 0])

    retargetable = stack()
    state = install_split_residual_caps(retargetable, first, range(6), 8, torch.device("cpu"), torch.float32,
                                        retargetable=True)
    state.mask[:5] = mask
    for axis in (first, second, first):  # and back: nothing of the second axis stays behind
        retarget_split_residual_caps(retargetable, axis, torch.float32)
        fresh = stack()
        fresh_state = install_split_residual_caps(fresh, axis, range(6), 8, torch.device("cpu"), torch.float32)
        fresh_state.mask[:5] = mask
        got, got_projections = run(retargetable, state, hidden, residual)
        want, want_projections = run(fresh, fresh_state, hidden, residual)
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.equal(got_projections, want_projections)  # the monitor layer's, moved with the axis
        assert state.hits[axis.cap_layers].tolist() == fresh_state.hits.tolist()
        assert state.hits.sum() == fresh_state.hits.sum() > 0  # layers outside the band never cap
    with pytest.raises(RuntimeError, match="not installed retargetable"):
        retarget_split_residual_caps(fresh, first, torch.float32)
    with pytest.raises(ValueError, match="retargetable caps need every layer in one process, not layers 0-2"):
        install_split_residual_caps(stack(), first, range(3), 8, torch.device("cpu"), torch.float32, retargetable=True)
