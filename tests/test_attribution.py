"""Router-logit attribution (captum) and routing shift on a real tiny MoE."""

from __future__ import annotations

import pytest
import torch

from esft_core.errors import EsftError
from esft_core.evaluation.attribution import route, router_attribution, routing_shift
from esft_core.models.loading import moe_layout, tiny_moe


class ByteTok:
    pad_token_id, bos_token_id = 0, 1

    def decode(self, ids):
        return f"<{ids[0]}>"


IDS = [1, 5, 9, 33, 70, 12, 8, 100]


def test_attributions_are_complete_and_causal():
    model = tiny_moe("deepseek_v2", seed=0)
    a = router_attribution(model, ByteTok(), IDS, layer=2, expert=3, target=5, n_steps=128)
    assert len(a.scores) == 6 and a.tokens[0] == "<1>" and a.target == 5  # later tokens cannot matter
    assert a.scores[0] == 0.0  # BOS is kept in the baseline, so it gets no credit
    # completeness: Σ attributions = logit(input) − logit(baseline), up to the integration error
    assert sum(a.scores) == pytest.approx(a.logit - a.baseline_logit, abs=0.05 * abs(a.logit - a.baseline_logit) + 1e-3)
    assert a.delta < 0.05 * abs(a.logit - a.baseline_logit) + 1e-3
    # the explained logit is the router's own output at that position
    logits = {}
    h = moe_layout(model).routers[2].register_forward_hook(lambda m, i, o: logits.update(x=o[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor([IDS[:6]]))
    h.remove()
    assert a.logit == pytest.approx(float(logits["x"].reshape(6, -1)[5, 3]), rel=1e-5)


def test_attribution_rejects_bad_targets():
    model = tiny_moe("deepseek_v2", seed=0)
    with pytest.raises(EsftError, match="not an MoE layer"):
        router_attribution(model, ByteTok(), IDS, layer=0, expert=1)
    with pytest.raises(EsftError, match="does not exist"):
        router_attribution(model, ByteTok(), IDS, layer=1, expert=99)
    with pytest.raises(EsftError, match="outside"):
        router_attribution(model, ByteTok(), IDS, layer=1, expert=1, target=50)


def test_routing_shift_is_zero_for_the_same_model_and_moves_after_changing_experts():
    base, tuned = tiny_moe("deepseek_v2", seed=0), tiny_moe("deepseek_v2", seed=0)
    same = routing_shift(base, tuned, [IDS, IDS[:4]], {1: [0, 1], 2: [3]})
    changed = {(r["layer"], r["measure"]): r["value"] for r in same}
    assert changed[(1, "top-k set changed")] == 0.0 and changed[(2, "top-k overlap")] == 1.0
    assert changed[(1, "weight on trained experts (before)")] == changed[(1, "weight on trained experts (after)")]
    with torch.no_grad():  # perturb layer 1's experts: layer 1 routing is unchanged (router frozen), layer 2 moves
        for p in moe_layout(tuned).experts[1].parameters():
            p.add_(torch.randn_like(p))
    rows = {(r["layer"], r["measure"]): r["value"] for r in routing_shift(base, tuned, [IDS, IDS[:4]])}
    assert rows[(1, "top-k set changed")] == 0.0 and rows[(2, "top-k set changed")] > 0.0
    idx, w = route(base, [IDS])[1]
    assert idx.shape == w.shape == (len(IDS), 2)
