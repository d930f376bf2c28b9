"""The one expert-config type: the authors' bytes round-trip, bad files are one-line errors, no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from esft_core.errors import EsftError
from esft_core.experts.expert_config import ExpertConfig

OFFICIAL = Path(__file__).parent / "fixtures" / "esft-official" / "expert_configs"


@pytest.mark.parametrize("task", ["intent", "law"])
def test_authors_files_round_trip_byte_identical(tmp_path, task):
    raw = (OFFICIAL / f"{task}.json").read_bytes()
    cfg = ExpertConfig.load(OFFICIAL / f"{task}.json")
    assert cfg.to_json().encode() == raw
    cfg.save(tmp_path / "c.json")
    assert (tmp_path / "c.json").read_bytes() == raw
    assert cfg.n_selected == sum(len(v) for v in json.loads(raw)["experts"].values())


def test_bad_configs_are_one_line_errors(tmp_path):
    for text, msg in [("{", "invalid JSON"), ('{"experts": {"x": [1]}}', "not an integer"),
                      ('{"experts": {"1": [1, 1]}}', "twice"), ('{"experts": {"1": ["a"]}}', "integer expert ids"),
                      ('{"experts": {"1": [-1]}}', "negative"),
                      ('{"experts": {}, "shared_experts": 1}', "true or false")]:
        (tmp_path / "c.json").write_text(text)
        with pytest.raises(EsftError, match=msg):
            ExpertConfig.load(tmp_path / "c.json")
    with pytest.raises(EsftError, match="does not exist"):
        ExpertConfig.load(tmp_path / "none.json")
    with pytest.raises(EsftError, match="out of range"):
        ExpertConfig({1: [9]}).check_range(8)


def test_module_is_torch_free():
    code = "import sys, esft_core.experts.expert_config, esft_core.selection.select; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_esft_reexports_the_same_type():
    from esft_core.experts import esft

    assert esft.ExpertConfig is ExpertConfig


def test_layer_keys_naming_the_same_layer_are_refused():
    with pytest.raises(EsftError, match=r"layer 1 is listed twice \(keys '1' and '01'\)"):
        ExpertConfig.from_dict({"experts": {"1": [2], "01": [3]}})
