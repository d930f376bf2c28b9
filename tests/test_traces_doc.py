"""Every SQL query of the README cookbook runs on a real trace DB (official imports + a recorded run)."""

import re
from pathlib import Path

import pytest

from esft_core.models.loading import REPO_ROOT, tiny_moe, tiny_tokenizer
from esft_core.traces import official, record, store

DOC = Path(REPO_ROOT) / "README.md"
OFFICIAL = Path(REPO_ROOT) / "tests" / "fixtures" / "esft-official" / "expert_scores"
QUERIES = re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def doc_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("doc") / "traces.duckdb"
    official.import_official(OFFICIAL / "intent", "intent", db)  # run 1
    official.import_official(OFFICIAL / "law", "law", db)  # run 2
    recs = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": "yes"}]}
            for i in range(20)]
    record.record(tiny_moe("olmoe", seed=0), tiny_tokenizer(), recs, db, "chat", max_tokens=200)  # run 3
    return db


def test_cookbook_has_the_promised_queries():
    assert len(QUERIES) >= 6


@pytest.mark.parametrize("i", range(len(QUERIES)))
def test_cookbook_query_runs(doc_db, i):
    with store.reader(doc_db, external_access=False) as con:
        rows = con.execute(QUERIES[i]).fetchall()
    assert rows, QUERIES[i]


def test_cookbook_answers_are_sane(doc_db):
    load = next(q for q in QUERIES if "AS load" in q)
    with store.reader(doc_db) as con:
        per_layer = {}
        for layer, _, share in con.execute(load).fetchall():
            per_layer[layer] = per_layer.get(layer, 0) + share
        assert sorted(per_layer) == list(range(1, 27))
        assert all(abs(v - 1) < 1e-9 for v in per_layer.values())
        compare = next(q for q in QUERIES if "total_variation" in q)
        rows = con.execute(compare).fetchall()
        assert len(rows) == 26 and all(0 < tv < 1 and 0 <= shared <= 5 for _, tv, shared in rows)
