"""The router's auxiliary balance loss, for runs that train the router.

ESFT freezes the routers, so their balance loss has no gradient to give. When a router does train — paper Table 3's
`non_expert_modules: true`, and full fine-tuning — the authors' training adds the model's own auxiliary loss to the
LM loss: DeepSeek-V2's sequence-level balance loss (`seq_aux`, `aux_loss_alpha` = 0.001 in the V2-Lite config),
which their modeling code adds in training mode. transformers v5's DeepSeek-V2/V3 classes carry no auxiliary loss,
so it is computed here from the routers' outputs (a forward hook on each router, no patched modeling code):

    per MoE layer, per sequence b of S tokens, K experts per token, E experts:
    f_b,i = count of (token, k) slots of b routed to i / (S·K / E)          (no gradient: a count)
    P_b,i = mean over the S tokens of softmax(router_logits)_i               (gradient to the router)
    aux   = alpha · mean_b Σ_i f_b,i · P_b,i,  summed over layers,  as the authors' DeepseekV2 `MoEGate`.

Families whose transformers class exposes its own auxiliary loss (Mixtral, Qwen2/3-MoE, OLMoE, ...: `forward(...,
output_router_logits=True)` adds `router_aux_loss_coef · aux` to `loss`) use that instead (`kind` 'model').
"""

from __future__ import annotations

import torch
from torch import nn

from esft_core.models.loading import MoeLayout

SEQ_AUX_ALPHA = 0.001  # DeepSeek-V2(-Lite)'s aux_loss_alpha; transformers v5's config has no such field


def router_trains(model: nn.Module, layout: MoeLayout) -> bool:
    """Whether any router weight of the model receives gradients (Table 3's non-expert modules, FFT)."""
    names = {id(p) for r in layout.routers.values() for p in r.parameters()}
    return any(p.requires_grad for p in model.parameters() if id(p) in names)


def aux_kind(model: nn.Module) -> str:
    """'model': the transformers class adds its own aux loss with output_router_logits=True; else 'seq_aux'."""
    return "model" if getattr(model, "router_aux_loss_coef", None) else "seq_aux"


def seq_aux_loss(logits: torch.Tensor, topk: torch.Tensor, batch: int, alpha: float) -> torch.Tensor:
    """DeepSeek-V2's sequence-level balance loss of one layer. logits (B·S, E), topk (B·S, K) → scalar."""
    n_exp, k = logits.shape[-1], topk.shape[-1]
    seq = logits.shape[0] // batch
    scores = logits.float().softmax(dim=-1).view(batch, seq, n_exp)  # (B, S, E)
    ce = torch.zeros(batch, n_exp, device=logits.device)
    ce.scatter_add_(1, topk.reshape(batch, seq * k), torch.ones(batch, seq * k, device=logits.device))
    ce = ce / (seq * k / n_exp)  # (B, E): 1.0 each under perfect balance
    return (ce * scores.mean(dim=1)).sum(dim=1).mean() * alpha


class RouterAux:
    """Collects every router's (logits, top-K ids) of one forward and turns them into the seq_aux loss."""

    def __init__(self, layout: MoeLayout, alpha: float = SEQ_AUX_ALPHA):
        self.alpha = alpha
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = [r.register_forward_hook(self._hook) for r in layout.routers.values()]

    def _hook(self, module, inputs, output):
        if isinstance(output, tuple) and len(output) >= 3:  # (router_logits (T, E), weights (T, K), ids (T, K))
            self.captured.append((output[0], output[2]))

    def loss(self, batch: int) -> torch.Tensor | None:
        """Σ over the layers of the last forward; None if no router ran. Clears what it read."""
        parts = [seq_aux_loss(lg, ids, batch, self.alpha) for lg, ids in self.captured]
        self.captured.clear()
        return torch.stack(parts).sum() if parts else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
