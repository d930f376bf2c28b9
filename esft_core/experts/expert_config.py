"""The expert config: which experts ESFT trains, in the authors' JSON format. Torch-free, so selection, the CLI and
the explorer use it without importing a model stack; esft/train/adapters use the same type.

Format (the authors' scripts/generate_expert_config.py output):
    {"experts": {"<decoder layer>": [expert ids, highest score first], ...},
     "shared_experts": false, "non_expert_modules": false}
Layer keys come in string order ("1", "10", "11", ..., "2") and ids keep the order they were given in (a selection
gives them by score), so a config written here from the authors' scores is byte-identical to their shipped file.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from esft_core.errors import EsftError, bounded, brief
from esft_core.files import write_text


@dataclass
class ExpertConfig:
    """Which experts to train, in the authors' meaning."""

    experts: dict[int, list[int]] = field(
        metadata={"help": "decoder-layer index -> routed expert ids to train (order kept: by score in a selection)"})
    shared_experts: bool = field(default=False, metadata={"help": "also train the shared experts of MoE layers"})
    non_expert_modules: bool = field(
        default=False, metadata={"help": "also train everything outside the experts (attention, norms, routers, ...)"}
    )

    def __post_init__(self):
        for layer, ids in self.experts.items():
            if len(set(ids)) != len(ids):
                twice = [i for i, c in Counter(ids).items() if c > 1]
                raise EsftError(f"expert config: layer {layer} lists an expert twice ({brief(twice)})")
            bad = [i for i in ids if int(i) < 0]
            if bad:
                raise EsftError(f"expert config: layer {layer}: expert id {bad[0]} is negative")
        self.experts = {int(k): [int(i) for i in v] for k, v in sorted(self.experts.items(), key=lambda kv: int(kv[0]))}

    # -- reading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d, where: str = "expert config") -> ExpertConfig:
        if not isinstance(d, dict) or not isinstance(d.get("experts"), dict):
            raise EsftError(f"{where}: expected {{\"experts\": {{\"<layer>\": [expert ids]}}, ...}}")
        experts, keys = {}, {}
        for k, v in d["experts"].items():
            try:
                layer = int(k)
            except (TypeError, ValueError):
                raise EsftError(f"{where}: layer key {k!r} is not an integer") from None
            if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                got = bounded(repr(v), 80)
                raise EsftError(f"{where}: layer {k}: expected a list of integer expert ids, got {got}")
            if layer in experts:  # "1" and "01" name the same layer: refuse rather than silently keep one
                raise EsftError(f"{where}: layer {layer} is listed twice (keys {keys[layer]!r} and {k!r})")
            experts[layer], keys[layer] = v, k
        for flag in ("shared_experts", "non_expert_modules"):
            if not isinstance(d.get(flag, False), bool):
                raise EsftError(f"{where}: '{flag}' must be true or false")
        return cls(experts, bool(d.get("shared_experts", False)), bool(d.get("non_expert_modules", False)))

    @classmethod
    def load(cls, path: str | Path) -> ExpertConfig:
        path = Path(path)
        if not path.is_file():
            raise EsftError(f"expert config {path} does not exist")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EsftError(f"expert config {path}: invalid JSON ({getattr(e, 'msg', e)})") from None
        return cls.from_dict(d, where=f"expert config {path}")

    @staticmethod
    def parse_ids(text: str, num_experts: int) -> list[int]:
        """'3, 17 40' → [3, 17, 40] (order kept, duplicates dropped); EsftError names the bad entry."""
        out: list[int] = []
        for part in text.replace(",", " ").split():
            if not part.lstrip("-").isdigit():
                raise EsftError(f"'{part}' is not an expert id")
            e = int(part)
            if not 0 <= e < num_experts:
                raise EsftError(f"expert {e} does not exist (0..{num_experts - 1})")
            if e not in out:
                out.append(e)
        return out

    # -- writing ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The authors' structure; layer keys in string order, as their files."""
        return {
            "experts": {str(k): list(self.experts[k]) for k in sorted(self.experts, key=str)},
            "shared_experts": self.shared_experts,
            "non_expert_modules": self.non_expert_modules,
        }

    def to_json(self) -> str:
        """The authors' bytes: json.dumps of to_dict() with default separators, no indent, no trailing newline."""
        return json.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        """Write to_json() atomically (tmp file + rename)."""
        write_text(path, self.to_json())

    # -- facts --------------------------------------------------------------------------------------------------
    @property
    def n_selected(self) -> int:
        return sum(len(v) for v in self.experts.values())

    def check_range(self, num_experts: int, layers: list[int] | None = None) -> None:
        """EsftError when an id is not an expert of the model or a layer is not one of its MoE layers."""
        for layer, ids in self.experts.items():
            if layers is not None and layer not in layers:
                raise EsftError(f"expert config: layer {layer} is not an MoE layer ({brief(layers)})")
            bad = [i for i in ids if i >= num_experts]
            if bad:
                raise EsftError(f"expert config: layer {layer}: expert {bad[0]} out of range 0..{num_experts - 1}")
