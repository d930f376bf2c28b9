"""Every MoE causal-LM family of the installed transformers, tiny and seeded: recording, ESFT, LoRA.

The family list is not kept by hand: `moe_families()` scans the installed transformers' model configs, so a family
added by a transformers upgrade is tested (and fails loudly until it works or gets an explicit refusal).
"""

import warnings

import pytest
import torch

from esft_core.errors import EsftError
from esft_core.experts.esft import ExpertConfig, apply_esft, merge_selected, selected_parameters
from esft_core.models.loading import FAMILY_EXCEPTIONS, expert_tensors, lora_targets, moe_families, moe_layout, tiny_moe
from esft_core.traces.record import Recorder

FAMILIES = moe_families()
REFUSED = {f for f, v in FAMILY_EXCEPTIONS.items() if "refuse" in v}
SEQS = [[5, 17, 33, 9, 71, 12, 40, 3, 88, 21, 64, 7], [11, 45, 6, 99, 30, 14, 8]]  # unequal lengths: padding


def test_family_scan_finds_the_known_families():
    # a scan that silently found nothing (or lost a well-known family) would make the test below vacuous
    assert len(FAMILIES) >= 50
    assert {"deepseek_v2", "deepseek_v3", "mixtral", "qwen3_moe", "dbrx", "llama4_text", "jamba"} <= set(FAMILIES)
    assert REFUSED <= set(FAMILIES)


def test_family_list_is_the_locked_one():
    """tests/fixtures/families.lock.txt is the family scan of the locked transformers (`make lock` writes it), so
    `make test-latest` can name the families a newer release adds."""
    from pathlib import Path

    locked = (Path(__file__).parent / "fixtures" / "families.lock.txt").read_text().split()
    assert FAMILIES == locked


def _received(lay):
    """Independent reference: wrap every experts module's forward (or, for dense experts, the router's) and keep
    the (indices, weights) it was actually called with."""
    got, restore = {}, []
    for layer in lay.layers:
        if lay.routing[layer] == "router_dense":
            mod = lay.routers[layer]
            orig = mod.forward

            def fwd(*a, _o=orig, _l=layer, **kw):
                out = _o(*a, **kw)
                scores = out[0]  # (T, E): nonzero on the routed experts only
                got[_l] = ("dense", scores.detach())
                return out
        else:
            mod = lay.experts[layer]
            orig = mod.forward

            def fwd(hidden, idx, w, *a, _o=orig, _l=layer, **kw):
                got[_l] = ("topk", idx.detach().clone(), w.detach().clone())
                return _o(hidden, idx, w, *a, **kw)
        mod.forward = fwd
        restore.append(mod)
    return got, restore


def _check_recording(model, lay):
    rec = Recorder(model, None, lay)
    got, restore = _received(lay)
    try:
        b = rec.forward_batch(SEQS)
    finally:
        for m in restore:
            del m.forward
    valid = torch.zeros(2, max(map(len, SEQS)), dtype=torch.bool)
    for i, s in enumerate(SEQS):
        valid[i, : len(s)] = True
    valid = valid.reshape(-1)
    n_tok = sum(map(len, SEQS))
    assert b["experts"].shape[1] == n_tok
    for li, layer in enumerate(lay.layers):
        kind, *ref = got[layer]
        rec_e, rec_w = b["experts"][li], b["weights"][li]  # (T, K), rank-ordered, -1 on dropped slots
        n_e = lay.layer_experts[layer]
        if kind == "dense":
            scores = ref[0][valid]  # (T, E)
            for t in range(n_tok):
                nz = {int(e) for e in torch.nonzero(scores[t]).flatten()}
                assert {int(e) for e in rec_e[t] if e >= 0} == nz
            continue
        idx, w = ref[0].reshape(-1, ref[0].shape[-1])[valid], ref[1].reshape(-1, ref[1].shape[-1])[valid]
        for t in range(n_tok):
            want = {(int(e), round(float(x), 5)) for e, x in zip(idx[t], w[t], strict=True)
                    if e < n_e and not (lay.masked_zero_slots and float(x) == 0.0)}
            have = {(int(e), round(float(x), 5)) for e, x in zip(rec_e[t], rec_w[t], strict=True) if e >= 0}
            assert have == want, (layer, t)
            ws = [float(x) for e, x in zip(rec_e[t], rec_w[t], strict=True) if e >= 0]
            assert ws == sorted(ws, reverse=True)
    counts = b["cnt"].sum(0)  # (L, E) tokens per expert in this batch
    return counts


def _logits(model):
    ids = torch.tensor([SEQS[0]])
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _train(model, params, steps=2, lr=1e-2):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ids = torch.tensor([SEQS[0]])
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    model.eval()
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family(family):
    if family in REFUSED:
        with pytest.raises(EsftError, match=f"model family '{family}' is not supported: .{{40}}") as e:
            tiny_moe(family, seed=0)
        assert "\n" not in str(e.value)
        return
    model = tiny_moe(family, seed=0)
    lay = moe_layout(model)
    assert lay.layers and all(lay.layer_experts[x] >= 8 and lay.layer_top_k[x] >= 1 for x in lay.layers)

    # 1. what the recorder stores is what the experts received
    counts = _check_recording(model, lay)

    # 2. ESFT wrapping is exact before training; 3. training moves only the selected expert slices
    hot = {layer: [int(e) for e in torch.as_tensor(counts[li]).argsort(descending=True)[:2]]
           for li, layer in enumerate(lay.layers)}  # experts the batch certainly routes to
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = _logits(model)
    apply_esft(model, ExpertConfig(hot))
    assert torch.equal(_logits(model), ref)
    _train(model, selected_parameters(model))
    merge_selected(model)
    lay = moe_layout(model)
    fused = {id(t.param): (layer, t) for layer in lay.layers for t in expert_tensors(lay, layer)}
    moved = 0
    for n, p in model.named_parameters():
        if id(p) not in fused:
            assert torch.equal(p, before[n]), f"{n} changed but is not a selected expert slice"
            continue
        layer, t = fused[id(p)]
        new, old = t.expert_view(p.detach()), t.expert_view(before[n])
        for e in range(t.num_experts):
            if e in hot[layer]:
                moved += int(not torch.equal(new[e], old[e]))
            else:
                assert torch.equal(new[e], old[e]), f"{n}: expert {e} of layer {layer} changed but was not selected"
    assert moved > 0

    # 4. LoRA trains (attention-side Linears + fused experts)
    from peft import LoraConfig, get_peft_model

    from esft_core.tuning.methods import PEFT_REMAPPED

    fresh = tiny_moe(family, seed=0)
    modules, params = lora_targets(fresh, PEFT_REMAPPED)
    flat = any(t.rows > 1 for layer in lay.layers for t in expert_tensors(lay, layer))
    assert bool(params) != flat, "fused [E, ...] experts are LoRA targets; flat nested ones (DBRX) are not"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(fresh, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                                      target_modules=modules or None, target_parameters=params))
    lora = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    losses = _train(peft_model, [p for p in peft_model.parameters() if p.requires_grad], steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in peft_model.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    if not flat:
        assert any("experts." in n for n in changed), "no expert LoRA weight moved"
    assert any("experts." not in n for n in changed) or not modules, "no attention-side LoRA weight moved"


def test_loader_falls_back_to_config_architectures(tmp_path, run_esft):
    # mistral4 has a causal-LM class but no AutoModelForCausalLM entry: load_model takes config.architectures
    import transformers

    from esft_core.models.loading import load_model, tiny_config, tiny_tokenizer

    torch.manual_seed(0)
    model = transformers.Mistral4ForCausalLM(tiny_config("mistral4"))
    model.config.architectures = ["Mistral4ForCausalLM"]
    model.save_pretrained(tmp_path / "m4")
    tiny_tokenizer().save_pretrained(tmp_path / "m4")
    loaded, _ = load_model(tmp_path / "m4")
    assert type(loaded).__name__ == "Mistral4ForCausalLM" and moe_layout(loaded).layers
    # every load failure is one clear line, exit 2, nothing written
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "mistral4", "architectures": ["NoSuchClass"], "hidden_size": 7}')
    (bad / "model.safetensors").write_bytes(b"")  # past the pre-flight file checks: the loader itself must fail
    tiny_tokenizer().save_pretrained(bad)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    r = run_esft("record", "--model", bad, "--data", data, "--task", "t", "--db", tmp_path / "t.duckdb")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot load model" in r.stderr, r.stderr
    assert not (tmp_path / "t.duckdb").exists()
