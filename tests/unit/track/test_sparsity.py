"""Known updates give known sparsity under every definition and in every snapshot mode."""
import pytest
import torch
import torch.nn as nn

from sparsecomm.track import SparsityTracker, kind_of, named_parameter_kinds


class TinyGPT(nn.Module):
    """GPT-2 parameter naming without transformers: wte, h.0.ln_1, h.0.attn.c_attn, h.0.mlp.c_fc."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 10)
        self.h = nn.ModuleList([nn.Module()])
        self.h[0].ln_1 = nn.LayerNorm(10)
        self.h[0].attn = nn.Module()
        self.h[0].attn.c_attn = nn.Linear(10, 10, bias=False)
        self.h[0].mlp = nn.Module()
        self.h[0].mlp.c_fc = nn.Linear(10, 10, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.fill_(1.0)


def test_layer_kinds():
    kinds = named_parameter_kinds(TinyGPT())
    assert kinds == {"wte.weight": "embedding", "h.0.ln_1.weight": "norm", "h.0.ln_1.bias": "norm",
                     "h.0.attn.c_attn.weight": "attention", "h.0.mlp.c_fc.weight": "mlp"}
    assert kind_of("model.layers.3.self_attn.q_proj.weight") == "attention"
    assert kind_of("model.layers.3.mlp.down_proj.weight") == "mlp"
    assert kind_of("model.norm.weight") == "norm"
    assert kind_of("transformer.h.0.attn.c_proj.weight") == "attention"
    assert kind_of("transformer.h.0.mlp.c_proj.weight") == "mlp"
    assert kind_of("score.weight") == "other"


def perturb(model, small=1e-4, large=1e-2):
    """In the attention matrix (100 weights of value 1.0): 10 below half a bf16 ULP, 10 above."""
    w = model.h[0].attn.c_attn.weight.data.view(-1)
    w[:10] += small  # bf16 ULP at 1.0 is 2**-7: 1e-4 rounds away in bf16, stays in fp32
    w[10:20] += large


@pytest.mark.parametrize("mode", ["fp32", "cpu"])
def test_known_update_every_definition(mode):
    model = TinyGPT()
    tr = SparsityTracker(model, mode=mode, rel_tau=1e-3, abs_tau=0.0, k_steps=())
    perturb(model)
    m = tr.step()
    total = sum(p.numel() for p in model.parameters())  # 100 + 20 + 100 + 100 = 320
    assert m["sparsity/fp32_exact/kind/attention"] == pytest.approx(0.8)
    assert m["sparsity/bf16_view/kind/attention"] == pytest.approx(0.9)
    assert m["sparsity/rel_threshold/kind/attention"] == pytest.approx(0.9)
    assert m["sparsity/abs_threshold/kind/attention"] == pytest.approx(0.8)
    assert m["sparsity/fp32_exact/kind/mlp"] == 1.0 and m["sparsity/bf16_view/kind/norm"] == 1.0
    assert m["sparsity/fp32_exact/global"] == pytest.approx(1 - 20 / total)
    assert m["sparsity/bf16_view/global"] == pytest.approx(1 - 10 / total)
    assert m["sparsity/fp32_exact/param/h.0.attn.c_attn.weight"] == pytest.approx(0.8)
    assert m["update/max_abs"] == pytest.approx(1e-2, rel=1e-3)
    assert m["update/mean_abs"] == pytest.approx((10 * 1e-4 + 10 * 1e-2) / total, rel=1e-3)
    # the next step with no change: everything unchanged under every definition
    m2 = tr.step()
    assert all(m2[f"sparsity/{d}/global"] == 1.0 for d in ("fp32_exact", "bf16_view", "rel_threshold", "abs_threshold"))


def test_bf16_mode_reports_only_the_bf16_view_and_costs_half():
    model = TinyGPT()
    fp32 = SparsityTracker(model, mode="fp32", k_steps=())
    tr = SparsityTracker(model, mode="bf16", k_steps=())
    assert tr.snapshot_bytes * 2 == fp32.snapshot_bytes
    perturb(model)
    m = tr.step()
    assert m["sparsity/bf16_view/kind/attention"] == pytest.approx(0.9)
    assert not any(k.startswith("sparsity/fp32_exact") for k in m)


def test_abs_threshold_is_the_plans_definition():
    model = TinyGPT()
    tr = SparsityTracker(model, abs_tau=5e-3, k_steps=())
    perturb(model)
    assert tr.step()["sparsity/abs_threshold/kind/attention"] == pytest.approx(0.9)


def test_k_step_accumulated_sparsity():
    model = TinyGPT()
    tr = SparsityTracker(model, k_steps=(3,))
    w = model.h[0].attn.c_attn.weight.data.view(-1)
    seen = []
    for step in range(6):
        w[step] += 1e-4  # a different weight each step, each below half a bf16 ULP
        seen.append(tr.step())
    assert "sparsity_k3/fp32_exact/global" not in seen[0]
    total = 320
    assert seen[2]["sparsity_k3/fp32_exact/global"] == pytest.approx(1 - 3 / total)
    assert seen[5]["sparsity_k3/fp32_exact/global"] == pytest.approx(1 - 3 / total)
    assert seen[2]["sparsity/fp32_exact/global"] == pytest.approx(1 - 1 / total)
    # three sub-ULP steps on three different weights: still invisible in bf16
    assert seen[2]["sparsity_k3/bf16_view/global"] == 1.0


def test_accumulated_sub_ulp_steps_become_visible_in_bf16():
    """fp32 sees a change every step; bf16 only at the one step where the drift crosses a rounding midpoint."""
    model = TinyGPT()
    tr = SparsityTracker(model, k_steps=(10,))
    w = model.h[0].attn.c_attn.weight.data.view(-1)
    fp32_changes, bf16_changes = 0, 0
    for _ in range(10):
        w[0] += 1e-3  # each step below half a bf16 ULP at 1.0 (3.9e-3); ten together (1e-2) above
        m = tr.step()
        fp32_changes += round((1 - m["sparsity/fp32_exact/global"]) * 320)
        bf16_changes += round((1 - m["sparsity/bf16_view/global"]) * 320)
    assert fp32_changes == 10 and bf16_changes == 1  # 1.004 crosses the midpoint 1 + 2**-8
    assert m["sparsity_k10/bf16_view/global"] == pytest.approx(1 - 1 / 320)
    assert m["sparsity_k10/fp32_exact/global"] == pytest.approx(1 - 1 / 320)


def test_hot_map_counts_frequent_changes():
    model = TinyGPT()
    tr = SparsityTracker(model, k_steps=(), hot_window=4)
    w = model.h[0].attn.c_attn.weight.data.view(-1)
    for step in range(4):
        w[:5] += 1e-2  # changed every step
        w[5 + step] += 1e-2  # changed once
        m = tr.step()
    assert m["hot/frac_changed_gt_half/kind/attention"] == pytest.approx(5 / 100)
    heat = tr.hot.heatmaps[4]["h.0.attn.c_attn.weight"]
    assert heat.shape == (10, 10) and heat[0, 0] == 1.0 and heat[0, 5] == 0.25 and heat[9, 9] == 0.0


def test_lr_over_median_abs_w():
    model = TinyGPT()
    tr = SparsityTracker(model, k_steps=())
    m = tr.step(lr=1e-5)
    assert m["update/median_abs_w"] == 1.0 and m["update/lr_over_median_abs_w"] == pytest.approx(1e-5)


def test_bad_config():
    with pytest.raises(ValueError, match="mode"):
        SparsityTracker(TinyGPT(), mode="fp8")
    with pytest.raises(ValueError, match="k_steps"):
        SparsityTracker(TinyGPT(), k_steps=(1,))
    with pytest.raises(ValueError, match="hot_definition"):
        SparsityTracker(TinyGPT(), mode="bf16", hot_window=2, hot_definition="fp32_exact")


def test_every_n_measures_exactly_the_nth_step():
    model = TinyGPT()
    tr = SparsityTracker(model, k_steps=(), every=2)
    w = model.h[0].attn.c_attn.weight.data.view(-1)
    out = []
    for step in range(4):
        w[: step + 1] += 1e-2  # step s changes s + 1 weights
        out.append(tr.step())
    assert out[0] == {} and out[2] == {}
    assert out[1]["sparsity/fp32_exact/kind/attention"] == pytest.approx(1 - 2 / 100)  # only step 2's change
    assert out[3]["sparsity/fp32_exact/kind/attention"] == pytest.approx(1 - 4 / 100)
    with pytest.raises(ValueError, match="multiples"):
        SparsityTracker(model, k_steps=(3,), every=2)
