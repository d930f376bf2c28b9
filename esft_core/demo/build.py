"""Build the demo MoE (data/demo-moe): train a BPE tokenizer and pre-train a tiny DeepSeek-V2 from scratch on CPU.

The model is transformers' native DeepseekV2ForCausalLM shaped like DeepSeek-V2-Lite but tiny: layer 0 dense, the
rest MoE with fine-grained routed experts, top-k routing and 2 shared experts. It is pre-trained on the general
corpus (Python documentation) plus plain-text documents of the two enhancement domains (math word problems, Python
functions) — never on the adaptation tasks' formats, so tuning has room to show. A DeepSeek-style auxiliary
load-balancing loss keeps every expert in use, which is what lets routing specialise by input type.

`python -m esft_core.demo.build --out data/demo-moe` (seeded; ~20 min on 2 CPU cores). `--tiny` builds a toy version
in seconds (used by the test-suite).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from esft_core.demo import tasks as demo_tasks
from esft_core.errors import EsftError

SPECIAL = {"pad": "<|pad|>", "bos": "<|bos|>", "eos": "<|eos|>"}


@dataclass
class BuildConfig:
    """Shape and training recipe of the demo model (every field is a CLI flag)."""

    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size (incl. 3 special tokens)"})
    hidden_size: int = field(default=128, metadata={"help": "model width"})
    num_layers: int = field(default=5, metadata={"help": "decoder layers; layer 0 is dense, the rest MoE"})
    num_experts: int = field(default=32, metadata={"help": "routed experts per MoE layer"})
    top_k: int = field(default=4, metadata={"help": "routed experts per token"})
    shared_experts: int = field(default=2, metadata={"help": "shared experts per MoE layer"})
    moe_intermediate: int = field(default=64, metadata={"help": "hidden width of one routed expert"})
    dense_intermediate: int = field(default=384, metadata={"help": "hidden width of the dense layer-0 MLP"})
    seq_len: int = field(default=256, metadata={"help": "pre-training sequence length"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    lr: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate (cosine to 10%, 50 warmup steps)"})
    aux_loss: float = field(default=0.01, metadata={"help": "weight of the expert load-balancing loss"})
    domain_docs: int = field(default=6000, metadata={"help": "plain-text documents per enhancement domain"})
    adaptation_docs: int = field(default=0, metadata={
        "help": "plain-text documents per adaptation domain (prompt content only, never answers; 0 = none, v1)"})
    chat_tasks: str = field(default="", metadata={
        "help": "comma-separated demo tasks whose chat-format examples (with answers) join pre-training, as the "
                "instruction data a real base model has seen; never a task the benchmark tunes on"})
    chat_docs: int = field(default=0, metadata={"help": "chat examples per --chat-tasks task"})
    tokenizer: str = field(default="", metadata={"help": "reuse this folder's tokenizer instead of training one"})
    corpus_limit: int = field(default=0, metadata={"help": "use only this many general documents (0 = all)"})
    seed: int = field(default=0, metadata={"help": "seed for data order and initialisation"})

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_experts", "top_k", "moe_intermediate",
                     "dense_intermediate", "seq_len", "batch_size", "steps", "domain_docs"):
            if getattr(self, name) <= 0:
                raise EsftError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.num_layers < 2:
            raise EsftError("--num-layers must be at least 2 (layer 0 is dense)")
        if self.top_k > self.num_experts:
            raise EsftError(f"--top-k {self.top_k} exceeds --num-experts {self.num_experts}")
        if self.vocab_size < 300:
            raise EsftError(f"--vocab-size must be at least 300 (256 bytes + merges), got {self.vocab_size}")
        if min(self.shared_experts, self.corpus_limit, self.adaptation_docs, self.aux_loss) < 0 or self.lr <= 0:
            raise EsftError("--shared-experts, --corpus-limit, --adaptation-docs and --aux-loss must be >= 0 "
                            "and --lr > 0")
        unknown = [t for t in self.chat_tasks.split(",") if t and t not in demo_tasks.TASKS]
        if unknown:
            raise EsftError(f"--chat-tasks: unknown task '{unknown[0]}'; choose from {', '.join(demo_tasks.TASKS)}")
        if self.tokenizer and not (Path(self.tokenizer) / "tokenizer.json").is_file():
            raise EsftError(f"--tokenizer {self.tokenizer}: no tokenizer.json in that folder")


TINY = dict(vocab_size=320, hidden_size=32, num_layers=3, num_experts=8, top_k=2, moe_intermediate=16,
            dense_intermediate=64, seq_len=64, batch_size=4, steps=3, domain_docs=50, corpus_limit=50)


def corpus(cfg: BuildConfig, adaptation: bool = True) -> list[str]:
    """Pre-training documents: general corpus train split + enhancement-domain texts (+ with `adaptation`, the
    adaptation domains' plain content, `--adaptation-docs` per domain), shuffled (seeded)."""
    docs = [r["text"] for r in demo_tasks.general_corpus()["train"]]
    if cfg.corpus_limit:
        docs = docs[: cfg.corpus_limit]
    for name, spec in demo_tasks.TASKS.items():
        if spec.kind == "enhancement":
            docs += demo_tasks.pretraining_texts(name, cfg.domain_docs)
        elif adaptation and cfg.adaptation_docs:
            docs += demo_tasks.domain_texts(name, cfg.adaptation_docs)
    if adaptation and cfg.chat_docs:
        for name in filter(None, cfg.chat_tasks.split(",")):
            docs += demo_tasks.chat_texts(name, cfg.chat_docs)
    random.Random(cfg.seed).shuffle(docs)
    return docs


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE trained on `docs`, wrapped so AutoTokenizer.from_pretrained loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL.values()), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
        model_max_length=1024,
    )


def model_config(cfg: BuildConfig, tok):
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.dense_intermediate,
        moe_intermediate_size=cfg.moe_intermediate, num_hidden_layers=cfg.num_layers, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=cfg.num_experts, n_shared_experts=cfg.shared_experts,
        num_experts_per_tok=cfg.top_k, first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=32, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        initializer_range=0.02,
    )


def token_windows(docs: list[str], tok, seq_len: int) -> torch.Tensor:
    """All documents as BOS doc EOS, concatenated and cut into (n_windows, seq_len) training windows."""
    ids: list[int] = []
    for enc in tok(docs, add_special_tokens=False)["input_ids"]:
        ids += [tok.bos_token_id, *enc, tok.eos_token_id]
    n = len(ids) // seq_len
    if n == 0:
        raise EsftError(f"corpus has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


class BalanceLoss:
    """DeepSeek-style auxiliary load-balancing loss collected from router forward hooks.

    Per MoE layer: E * sum_i f_i * P_i, where f_i = fraction of (token, slot) picks that went to expert i and
    P_i = mean router probability of expert i. Minimal (= 1) when load is uniform.
    """

    def __init__(self, layout):
        self.terms: list[torch.Tensor] = []
        self.handles = [r.register_forward_hook(self._hook) for r in layout.routers.values()]

    def _hook(self, module, inputs, output):
        logits, _, idx = output  # (T, E), (T, K), (T, K)
        probs = logits.softmax(-1)
        n_exp = probs.shape[-1]
        f = torch.bincount(idx.flatten(), minlength=n_exp).float() / idx.numel()
        self.terms.append(n_exp * (f * probs.mean(0)).sum())

    def pop(self) -> torch.Tensor:
        loss = torch.stack(self.terms).mean() if self.terms else torch.zeros(())
        self.terms = []
        return loss


def build(out: Path, cfg: BuildConfig, quiet: bool = False) -> dict:
    """Train tokenizer + model, save both to `out` with a build_log.json; returns the log."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from esft_core.models.loading import moe_layout

    torch.manual_seed(cfg.seed)
    t0 = time.time()
    docs = corpus(cfg)
    if cfg.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    else:  # on the corpus without the adaptation domains: v1's exact tokenizer, so v1 and v2 share one vocabulary
        tok = train_tokenizer(corpus(cfg, adaptation=False), cfg.vocab_size)
    windows = token_windows(docs, tok, cfg.seq_len)  # (n, seq_len)
    # grouped_mm runs the fused experts ~25% faster than the eager per-expert loop on CPU (measured while building).
    model = AutoModelForCausalLM.from_config(
        model_config(cfg, tok), dtype=torch.float32, experts_implementation="grouped_mm"
    )
    layout = moe_layout(model)
    with torch.no_grad():  # the v5 router is zero-initialised; start from small random logits instead
        for r in layout.routers.values():
            r.weight.normal_(0.0, 0.02)
    balance = BalanceLoss(layout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = min(50, max(1, cfg.steps // 10))

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        prog = (step - warm) / max(1, cfg.steps - warm)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    gen = torch.Generator().manual_seed(cfg.seed)
    curve = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="pre-train", disable=quiet)
    for step in bar:
        batch = windows[torch.randint(len(windows), (cfg.batch_size,), generator=gen)]  # (B, seq_len)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out_ = model(input_ids=batch, labels=batch)
        aux = balance.pop()
        loss = out_.loss + cfg.aux_loss * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(round(out_.loss.item(), 4))
        bar.set_postfix(loss=f"{out_.loss.item():.3f}", aux=f"{aux.item():.3f}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    # bfloat16 on disk keeps the folder small (DeepSeek-V2-Lite ships bf16 too); load_model upcasts to float32.
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    log = {
        "config": asdict(cfg), "params": sum(p.numel() for p in model.parameters()),
        "tokens_in_corpus": int(windows.numel()), "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "seconds": round(time.time() - t0, 1), "loss_curve": curve,
    }
    (out / "build_log.json").write_text(json.dumps(log) + "\n")
    return log


def parse_config(argv: list[str] | None) -> tuple[Path, BuildConfig, bool]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/demo-moe", help="output model folder")
    ap.add_argument("--tiny", action="store_true", help="toy sizes for a smoke test (seconds)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, f in BuildConfig.__dataclass_fields__.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(f.default), default=None, help=f.metadata["help"])
    args = ap.parse_args(argv)
    base = dict(TINY) if args.tiny else {}
    base.update({k: v for k, v in vars(args).items() if k in BuildConfig.__dataclass_fields__ and v is not None})
    return Path(args.out), BuildConfig(**base), args.quiet


def main(argv: list[str] | None = None) -> int:
    try:
        out, cfg, quiet = parse_config(argv)
        log = build(out, cfg, quiet)
    except EsftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = log["loss_curve"]
    print(f"built {out}: {log['params']:,} params, loss {c[0]:.3f} -> {c[-1]:.3f} in {log['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
