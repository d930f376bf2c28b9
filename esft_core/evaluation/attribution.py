"""Model-side analyses for the explorer: which input tokens drive an expert's router logit (captum Layer Integrated
Gradients on the input embeddings), and how fine-tuning shifted routing on the same prompts. No streamlit here.

Router logits are read with a forward hook on the router module (`forward(hidden) -> (logits (T, E), weights (T, K),
indices (T, K))`, uniform across transformers-v5 MoE families), so no modeling code is patched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from esft_core.errors import EsftError
from esft_core.files import write_json
from esft_core.models.loading import moe_layout


class _Stop(Exception):
    """Raised by the hook once the router of interest has run: later layers are not needed."""


@dataclass
class Attribution:
    tokens: list[str]
    scores: list[float]  # one per input token: contribution to the router logit (sums to logit - baseline logit)
    target: int  # position whose router logit is explained
    logit: float
    baseline_logit: float
    delta: float  # captum's convergence delta (completeness error)


def _router_logits(model: nn.Module, layer: int):
    """A function ids → router logits (batch, T, E) of `layer`, stopping the forward pass after that router."""
    lay = moe_layout(model)
    if layer not in lay.routers:
        raise EsftError(f"layer {layer} is not an MoE layer; MoE layers are {lay.layers}")
    router = lay.routers[layer]
    box = {}

    def hook(_mod, _inp, out):
        box["logits"] = out[0]
        raise _Stop

    def run(input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        h = router.register_forward_hook(hook)
        try:
            model(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        return box["logits"].reshape(batch, -1, box["logits"].shape[-1])  # (batch, T, E)

    return run, lay


def router_attribution(model: nn.Module, tok, input_ids: list[int], layer: int, expert: int,
                       target: int | None = None, n_steps: int = 24, baseline_id: int | None = None) -> Attribution:
    """Integrated gradients of the router logit of (`layer`, `expert`) at position `target` (default: the last
    token) w.r.t. the input embeddings, summed over the embedding dimension → one score per input token.

    Baseline: every token replaced by `baseline_id` (default: the pad token, else 0), BOS kept.
    """
    from captum.attr import LayerIntegratedGradients

    if not input_ids:
        raise EsftError("no tokens to attribute")
    run, lay = _router_logits(model, layer)
    if not 0 <= expert < lay.num_experts:
        raise EsftError(f"expert {expert} does not exist; layer {layer} has experts 0..{lay.num_experts - 1}")
    t = len(input_ids) - 1 if target is None else int(target)
    if not 0 <= t < len(input_ids):
        raise EsftError(f"target position {t} is outside the sample (0..{len(input_ids) - 1})")
    dev = model.get_input_embeddings().weight.device
    ids = torch.tensor([input_ids[: t + 1]], dtype=torch.long, device=dev)  # (1, t+1); causal: later tokens ignored
    pad = baseline_id if baseline_id is not None else (tok.pad_token_id if tok.pad_token_id is not None else 0)
    base = torch.full_like(ids, pad)
    if tok.bos_token_id is not None and int(ids[0, 0]) == tok.bos_token_id:
        base[0, 0] = ids[0, 0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return run(input_ids=x)[:, t, expert]

    was_training = model.training
    model.eval()
    try:
        lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
        attr, delta = lig.attribute(ids, baselines=base, n_steps=n_steps, return_convergence_delta=True,
                                    internal_batch_size=n_steps)
        with torch.no_grad():
            logit = float(forward(ids)[0])
            base_logit = float(forward(base)[0])
    finally:
        model.train(was_training)
    scores = attr.sum(-1)[0].detach().tolist()
    tokens = [tok.decode([i]) for i in ids[0].tolist()]
    return Attribution(tokens, [float(s) for s in scores], t, logit, base_logit, float(delta.abs().max()))


def route(model: nn.Module, input_ids: list[list[int]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Top-k (indices, weights) of every MoE layer for a list of sequences: {layer: ((N, K), (N, K))} over all
    tokens of all sequences (concatenated in order)."""
    lay = moe_layout(model)
    got: dict[int, list] = {layer: [] for layer in lay.layers}
    hooks = [lay.routers[layer].register_forward_hook(
        lambda _m, _i, out, layer=layer: got[layer].append((out[2].detach().reshape(-1, out[2].shape[-1]),
                                                            out[1].detach().reshape(-1, out[1].shape[-1]))))
        for layer in lay.layers]
    try:
        with torch.no_grad():
            for seq in input_ids:
                model(input_ids=torch.tensor([seq], dtype=torch.long), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {layer: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for layer, v in got.items()}


def routing_shift(base: nn.Module, tuned: nn.Module, input_ids: list[list[int]],
                  trained: dict[int, list[int]] | None = None) -> list[dict]:
    """Per MoE layer, on the same token sequences: share of tokens whose top-k expert set changed, mean top-k
    overlap, and (when `trained` experts are given) the share of routed gate weight landing on trained experts
    before and after tuning. Rows: {layer, measure, value}."""
    before, after = route(base, input_ids), route(tuned, input_ids)
    rows = []
    for layer in sorted(before):
        (ib, wb), (ia, wa) = before[layer], after[layer]
        sb, sa = torch.sort(ib, -1).values, torch.sort(ia, -1).values
        changed = (sb != sa).any(-1).float().mean().item()
        k = ib.shape[-1]
        overlap = ((ib.unsqueeze(-1) == ia.unsqueeze(-2)).any(-1).sum(-1).float() / k).mean().item()
        rows += [{"layer": layer, "measure": "top-k set changed", "value": changed},
                 {"layer": layer, "measure": "top-k overlap", "value": overlap}]
        if trained is not None:
            t = torch.tensor(sorted(trained.get(layer, trained.get(str(layer), []))), dtype=ib.dtype)
            for name, (i, w) in (("weight on trained experts (before)", (ib, wb)),
                                 ("weight on trained experts (after)", (ia, wa))):
                on = torch.isin(i, t) if t.numel() else torch.zeros_like(i, dtype=torch.bool)
                rows.append({"layer": layer, "measure": name,
                             "value": float((w * on).sum() / w.sum().clamp_min(1e-12))})
    return rows


def main(argv: list[str]) -> int:
    """`python -m esft_core.evaluation.attribution REQUEST.json OUT.json`: the background job of
    launchers.start_attribution. Stage
    progress (model loaded, integrated, written) as a tqdm bar in the job log; OUT is written atomically."""
    import dataclasses
    import json
    import sys
    from pathlib import Path

    from tqdm import tqdm

    from esft_core.models.loading import load_model

    if len(argv) != 2:
        print("usage: python -m esft_core.evaluation.attribution REQUEST.json OUT.json", file=sys.stderr)
        return 2
    try:
        req = json.loads(Path(argv[0]).read_text())
        with tqdm(total=3, desc="attribution", file=sys.stderr, mininterval=0) as bar:  # closed (newline) on errors
            bar.set_postfix_str("loading the model")
            model, tok = load_model(req["model"])
            bar.update()
            bar.set_postfix_str("integrating gradients")
            res = router_attribution(model, tok, req["input_ids"], int(req["layer"]), int(req["expert"]),
                                     target=int(req["target"]), n_steps=int(req["n_steps"]))
            bar.update()
            write_json(Path(argv[1]), {**dataclasses.asdict(res), "request": req}, indent=None)
            bar.update()
    except (EsftError, OSError, KeyError, ValueError) as e:
        print(f"esft attribution: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
