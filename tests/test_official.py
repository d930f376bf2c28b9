"""Import of the authors' routing logs: reproduce their summary.json and expert configs; reject bad logs whole."""

import gzip
import json
from pathlib import Path

import pytest

from esft_core.errors import EsftError
from esft_core.models.loading import REPO_ROOT
from esft_core.selection.scores import esft_summary, load_scores
from esft_core.selection.select import select_for_task
from esft_core.traces import official, store

OFFICIAL = Path(REPO_ROOT) / "tests" / "fixtures" / "esft-official"
TASKS = ("intent", "law")


@pytest.fixture(scope="module")
def official_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("official") / "official.duckdb"
    for task in TASKS:
        official.import_official(OFFICIAL / "expert_scores" / task, task, db)
    return db


@pytest.mark.parametrize("task", TASKS)
def test_summary_reproduced(official_db, task):
    ref = json.loads((OFFICIAL / "expert_scores" / task / "summary.json").read_text())
    got = esft_summary(official_db, task, normalize="token")
    assert set(got) == {"token_scores", "gate_scores"}
    for metric in got:
        assert set(got[metric]) == {str(i) for i in range(1, 27)}
        for layer, row in ref[metric].items():
            assert set(got[metric][layer]) == set(row)
            assert max(abs(got[metric][layer][e] - v) for e, v in row.items()) <= 1e-4, (metric, layer)
    assert got == ref  # in fact exactly equal after the authors' 4-decimal rounding


@pytest.mark.parametrize("task", TASKS)
def test_config_reproduced_every_layer(official_db, task):
    ref = json.loads((OFFICIAL / "expert_configs" / f"{task}.json").read_text())
    with store.reader(official_db) as con:
        cfg = select_for_task(con, task, "token", "token", p=0.2).to_dict()
    for layer, experts in ref["experts"].items():
        assert cfg["experts"][layer] == experts, layer
    assert json.dumps(cfg) == json.dumps(ref)  # same key order, same bytes


def test_runs_metadata_and_rank_order(official_db):
    with store.reader(official_db) as con:
        runs = con.execute("SELECT task, source, status, top_k, num_experts, len(layers), n_samples, n_tokens "
                           "FROM runs ORDER BY run_id").fetchall()
        assert runs == [("intent", "official", "complete", 6, 64, 26, 127, 8222),
                        ("law", "official", "complete", 6, 64, 26, 33, 8327)]
        # every (token, layer) has K rows with ranks 0..5 and weights descending
        bad = con.execute("""
            SELECT count(*) FROM (
              SELECT run_id, sample_id, position, layer, list(weight ORDER BY rank) AS w, list(rank) AS r
              FROM routes GROUP BY ALL)
            WHERE len(w) != 6 OR w != list_reverse_sort(w)""").fetchone()[0]
        assert bad == 0
        assert con.execute("SELECT count(*) FROM routes").fetchone()[0] == (8222 + 8327) * 26 * 6


def test_first_token_parsed_like_the_file(official_db):
    raw = gzip.decompress((OFFICIAL / "expert_scores" / "law" / "expert_weights_3.txt.gz").read_bytes())
    line = raw.decode().split("\n")[0]
    ids, ws = line.split("\t\t")
    pairs = sorted(zip([float(w) for w in ws.split("\t")[:6]], [int(i) for i in ids.split("\t")[:6]],
                       strict=True), key=lambda p: -p[0])
    with store.reader(official_db) as con:
        got = con.execute("SELECT weight, expert FROM routes WHERE run_id = 2 AND layer = 3 AND sample_id = 0 "
                          "AND position = 0 ORDER BY rank").fetchall()
    assert [e for _, e in got] == [e for _, e in pairs]
    assert [round(w, 4) for w, _ in got] == [w for w, _ in pairs]


def write_logs(d: Path, layers: dict[int, str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for layer, text in layers.items():
        (d / f"expert_weights_{layer}.txt").write_text(text)
    return d


GOOD = "1\t2\t3\t0\t\t0.5\t0.2\t0.1\t0.6\n2\t3\t\t0.3\t0.4\n"  # K=2: 2 tokens, then 1 token


def test_small_logs_infer_k_and_score(tmp_path, tmp_db):
    d = write_logs(tmp_path / "logs", {1: GOOD, 2: GOOD.replace("0.5", "0.7")})
    logs, k, n_e, lens = official.read_logs(d)
    assert (k, n_e, lens.tolist()) == (2, 4, [2, 1])
    official.import_official(d, "toy", tmp_db)
    s = load_scores(tmp_db, "toy", "token", "token")
    # layer 1: expert counts 0:1, 1:1, 2:2, 3:2 over 3 tokens x K=2
    assert s.row(1).tolist() == pytest.approx([1 / 6, 1 / 6, 2 / 6, 2 / 6])
    g = load_scores(tmp_db, "toy", "gate", "sample")
    # sample 0 (2 tokens): expert 2 gets 0.2 ; sample 1 (1 token): expert 2 gets 0.3 → (0.2/2 + 0.3/1) / 2
    assert g.row(1)[2] == pytest.approx((0.2 / 2 + 0.3) / 2)


@pytest.mark.parametrize("layers, message", [
    ({1: GOOD, 3: GOOD}, r"missing expert_weights_2\.txt"),
    ({1: GOOD, 2: "1\t2\t\t0.5\t0.2\n1\tx\t\t0.5\t0.2\n"}, r"expert_weights_2\.txt line 2: expert ids must be int"),
    ({1: GOOD, 2: "1\t2\t\t0.5\t0.2\n1\t2\t\t0.5\tabc\n"}, r"expert_weights_2\.txt line 2: gate weights must be"),
    ({1: GOOD, 2: "1\t2\t0.5\t0.2\n"}, r"expert_weights_2\.txt line 1: expected expert ids, two tabs"),
    ({1: "1\t2\t3\t0\t\t0.5\t0.2\t0.1\n"}, r"expert_weights_1\.txt line 1: 4 expert ids but 3 gate weights"),
    ({1: GOOD, 2: GOOD + GOOD}, r"expert_weights_2\.txt has 4 lines but expert_weights_1\.txt has 2"),
    ({1: GOOD, 2: "1\t2\t\t0.5\t0.2\n2\t3\t\t0.3\t0.4\n"}, r"expert_weights_2\.txt line 1: 2 expert ids but"),
])
def test_bad_logs_write_nothing(tmp_path, tmp_db, layers, message):
    official.import_official(write_logs(tmp_path / "ok", {1: GOOD}), "ok", tmp_db)
    before = tmp_db.read_bytes()
    with pytest.raises(EsftError, match=message) as e:
        official.import_official(write_logs(tmp_path / "bad", layers), "bad", tmp_db)
    assert "\n" not in str(e.value)
    assert tmp_db.read_bytes() == before


def test_no_logs_and_explicit_top_k(tmp_path, tmp_db):
    with pytest.raises(EsftError, match="holds no expert_weights"):
        official.import_official(tmp_path, "t", tmp_db)
    d = write_logs(tmp_path / "logs", {1: GOOD})
    with pytest.raises(EsftError, match="not a multiple of top-k 4"):
        official.read_logs(d, top_k=4)
    with pytest.raises(EsftError, match="--num-experts is 3"):
        official.read_logs(d, num_experts=3)
    assert not tmp_db.exists()


def test_plain_and_gzip_logs_import_alike(tmp_path):
    """The importer reads expert_weights_<layer>.txt and .txt.gz; a corrupt .gz is one clear error."""
    src = OFFICIAL / "expert_scores" / "intent"
    plain = tmp_path / "plain"
    plain.mkdir()
    for layer in (1, 2):
        (plain / f"expert_weights_{layer}.txt").write_bytes(
            gzip.decompress((src / f"expert_weights_{layer}.txt.gz").read_bytes()))
    got = [official.read_logs(plain)[0], official.read_logs(_gz_copy(src, tmp_path / "gz", (1, 2)))[0]]
    assert [lg.ids.tolist() for lg in got[0]] == [lg.ids.tolist() for lg in got[1]]
    assert [lg.weights.tolist() for lg in got[0]] == [lg.weights.tolist() for lg in got[1]]
    bad = _gz_copy(src, tmp_path / "bad", (1,))
    (bad / "expert_weights_1.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(EsftError, match="expert_weights_1.txt.gz: not a readable gzip file"):
        official.read_logs(bad)
    (plain / "expert_weights_1.txt.gz").write_bytes((src / "expert_weights_1.txt.gz").read_bytes())
    with pytest.raises(EsftError, match="layer 1 is there twice"):
        official.read_logs(plain)


def _gz_copy(src: Path, dst: Path, layers) -> Path:
    dst.mkdir()
    for layer in layers:
        (dst / f"expert_weights_{layer}.txt.gz").write_bytes((src / f"expert_weights_{layer}.txt.gz").read_bytes())
    return dst
