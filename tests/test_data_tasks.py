"""JSONL reader and built-in data; scoring plans; metrics."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attncache import UserError
from attncache import data as D
from attncache.tasks import auc, plan_rows


def write(tmp_path, lines: list[bytes]):
    p = tmp_path / "rows.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def test_jsonl_reports_and_skips_bad_rows(tmp_path):
    p = write(
        tmp_path,
        [
            json.dumps({"prompt": "Q?", "choices": ["a", "b"], "answer": 1}).encode(),
            b"{not json",
            b"\xff\xfe bad utf8",
            json.dumps({"prompt": "Q?", "choices": ["a", "b"], "answer": 5}).encode(),
            json.dumps({"prompt": "Q?", "choices": ["a", "b"], "answer": 2}).encode(),
            json.dumps({"prompt": "Q?", "choices": ["a"], "answer": 0}).encode(),
            json.dumps({"prompt": "  ", "choices": ["a", "b"], "answer": 0}).encode(),
            json.dumps({"text": 3}).encode(),
            json.dumps({"text1": "a", "text2": "b", "label": 1}).encode(),
            json.dumps([1, 2]).encode(),
            json.dumps({"text": "fine"}).encode(),
        ],
    )
    ds = D.read_jsonl(p)
    assert [type(r).__name__ for r in ds.rows] == ["ChoiceRow", "PairRow", "TextRow"]
    assert len(ds.skipped) == 8
    joined = "\n".join(ds.skipped)
    for needle in (
        ":2: malformed JSON",
        ":3: not valid UTF-8",
        ":4: 'answer' 5 is out of range",
        ":5: 'answer' 2 is out of range",
        ":6: 'choices' must be a list of at least 2",
        "'prompt' is empty",
        "'text' must be a string",
        "expected a JSON object",
    ):
        assert needle in joined
    with pytest.raises(UserError, match=":2: malformed"):
        D.read_jsonl(p, strict=True)


def test_load_errors_and_slices(tmp_path):
    with pytest.raises(UserError, match="did you mean 'sst2'"):
        D.load("sst")
    with pytest.raises(UserError, match="does not exist"):
        D.load(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="is a folder"):
        D.load(str(tmp_path) + "/")
    p = write(tmp_path, [json.dumps({"text": f"t{i}"}).encode() for i in range(10)])
    assert [r.text for r in D.load(f"{p}[2:5]").rows] == ["t2", "t3", "t4"]
    assert [r.text for r in D.load(f"{p}[1::4]").rows] == ["t1", "t5", "t9"]
    assert len(D.load(str(p), limit=4).rows) == 4
    with pytest.raises(UserError, match="no usable rows"):
        D.load(f"{p}[20:]")


def test_builtin_sets_load():
    sst = D.load("sst2[0:5]")
    assert len(sst.rows) == 5 and sst.rows[0].choices == (" negative", " positive")
    enc = D.load("sst2[0:3]", encoder=True)
    assert all(isinstance(r, D.TextRow) for r in enc.rows)
    m5 = D.load("mmlu:5shot", limit=2).rows[0]
    assert m5.prompt.count("Answer:") == 6 and m5.choices == (" A", " B", " C", " D")
    with pytest.raises(UserError, match="mmlu:Kshot"):
        D.load("mmlu:9shot")
    assert isinstance(D.load("rte[0:2]", encoder=True).rows[0], D.PairRow)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: (
            st.lists(c)
            | st.dictionaries(
                st.sampled_from(
                    ["prompt", "choices", "answer", "text", "text1", "text2", "label", "x"]
                ),
                c,
            )
        ),
        max_leaves=8,
    )
)
def test_parse_row_accepts_or_raises_valueerror(obj):
    """Any JSON value: either a row that carries exactly the input's fields, or a ValueError saying
    why."""
    try:
        row = D.parse_row(obj)
    except ValueError as e:
        assert str(e)  # a reason for the report
        return
    if isinstance(row, D.ChoiceRow):
        assert row.prompt == obj["prompt"] and row.choices == tuple(obj["choices"])
        assert 0 <= row.answer == obj["answer"] < len(row.choices) and len(row.choices) >= 2
    elif isinstance(row, D.PairRow):
        assert (row.text1, row.text2) == (obj["text1"], obj["text2"]) and row.label == obj.get(
            "label", 0
        )
    else:
        assert isinstance(row, D.TextRow) and row.text == obj["text"] and row.text.strip()


class CharTok:
    """Each character is a token; special tokens add a BOS id 1."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_agreement_counts_rows_with_a_prediction_only():
    """Pair and embedding rows have no prediction to agree on: they neither raise nor dilute
    agreement, and a plan of them alone reports none."""
    from attncache.tasks import Plan, RowPlan, RunOutput, compare
    from attncache.tasks.plan import Query

    def output(token: int) -> RunOutput:
        out = RunOutput.empty(3)
        out.logprobs = {(0, 1, 5): -1.0, (0, 1, 6): -2.0 if token == 5 else -0.5}
        out.embeddings = np.eye(3, dtype=np.float32)
        return out

    choice = RowPlan("choice1", [0], [[Query(0, 1, 5)], [Query(0, 1, 6)]], [1.0, 1.0], answer=0)
    pair = RowPlan("pair", [1, 2], label=1)
    seqs = [[1], [2], [3]]
    mixed = compare(Plan(seqs, [choice, pair], [], True), output(5), output(6))
    assert mixed.agreement == 0.0  # the one scored row changed its answer
    assert compare(Plan(seqs, [pair], [], False), output(5), output(6)).agreement is None


def test_a_plan_naming_an_input_it_does_not_have_is_refused():
    from attncache.tasks import Plan, RowPlan

    plan = Plan([[1]], [RowPlan("text", [0], index=2)], [], True)
    assert plan.by_input(3)[2] is not None
    with pytest.raises(ValueError, match="names input 2 of 2"):
        plan.by_input(2)


def test_a_row_runs_when_its_model_inputs_fit_exactly():
    """The bound is on what the model runs: prompt + choice without the choice's last token
    (``--max-tokens``: "model input longer than N"), so a row that fits to the token runs and
    one token more is skipped."""
    row = D.ChoiceRow("abc", ("xyz", "q"), 0)  # runs [1]+"abc"+"xy": 6 tokens
    assert len(plan_rows([row], CharTok(), causal=True, max_len=6).rows) == 1
    short = plan_rows([row], CharTok(), causal=True, max_len=5)
    assert not short.rows and "6 tokens is longer" in short.skipped[0]
    one = D.ChoiceRow("abc", ("x", "y"), 0)  # one-token choices: the prompt alone, 4 tokens
    assert len(plan_rows([one], CharTok(), causal=True, max_len=4).rows) == 1
    assert not plan_rows([one], CharTok(), causal=True, max_len=3).rows


def test_plan_single_and_multi_token_choices():
    rows = [
        D.ChoiceRow("ab", ("x", "y"), 0),
        D.ChoiceRow("ab", ("xy", "z"), 1),
        D.ChoiceRow("c" * 50, ("x", "y"), 0),
    ]
    plan = plan_rows(rows, CharTok(), causal=True, max_len=20)
    assert [r.kind for r in plan.rows] == ["choice1", "choiceN"]
    assert plan.skipped and "longer than" in plan.skipped[0]
    assert plan.seqs[0] == [1, 97, 98]  # the single-token row runs the prompt alone
    multi = plan.rows[1]
    # a choice's last token predicts nothing and is not run: "xy" runs "ab" + "x"; "z" (one
    # token) needs no sequence of its own
    assert [plan.seqs[s] for s in multi.seqs] == [[1, 97, 98], [1, 97, 98, 120]]
    prompt, xy = multi.seqs
    # x and z follow the prompt alone, which the first row runs already: they read its logits;
    # y is predicted by the last logits of "ab" + "x"
    assert [(q.seq, q.from_end, q.token) for q in multi.queries[0]] == [
        (prompt, 1, 120),
        (xy, 1, 121),
    ]
    assert [(q.seq, q.from_end, q.token) for q in multi.queries[1]] == [(prompt, 1, 122)]
    assert plan.need()[xy] == 1


def test_each_position_is_asked_for_once():
    """Choices' first tokens follow one prompt, so they read one position; later positions of a
    choice stay in its own sequence, which then needs one trailing position less."""
    rows = [D.ChoiceRow("ab", ("xy", "zw", "q"), 0), D.ChoiceRow("ab", ("xw", "v"), 1)]
    plan = plan_rows(rows, CharTok(), causal=True, max_len=None)
    positions = [
        (tuple(plan.seqs[q.seq][: len(plan.seqs[q.seq]) - q.from_end + 1]), q.token)
        for r in plan.rows
        for qs in r.queries
        for q in qs
    ]
    prefixes = {p for p, _ in positions}
    ab = (1, 97, 98)
    assert {p for p, t in positions if t in (120, 122, 113, 118)} == {ab}  # first tokens
    read = {(q.seq, q.from_end) for r in plan.rows for qs in r.queries for q in qs}
    assert len(read) == len(prefixes)  # one (sequence, position) per distinct prefix
    assert sorted(plan.seqs) == sorted([[1, 97, 98, 120], [1, 97, 98, 122]])  # no "q", "v" seq
    for r in plan.rows:  # a row lists every sequence its queries read (reruns, subsets)
        assert {q.seq for qs in r.queries for q in qs} == set(r.seqs)
    assert sum(plan.need()) == len(prefixes)


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 40).astype(float)
    y = rng.integers(0, 2, 40)
    pos, neg = s[y == 1], s[y == 0]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert np.isclose(auc(s, y), brute)


def test_positions_share_only_on_equal_tokens_even_when_hashes_collide(monkeypatch):
    """The planner keys positions by a hash of the tokens so far; a collision must not make two
    different prefixes read one position."""
    from attncache.tasks import plan as plan_mod

    rows = [D.ChoiceRow("ab", ("xy", "zw"), 0), D.ChoiceRow("cd", ("xy", "q"), 1)]
    honest = plan_rows(rows, CharTok(), causal=True, max_len=None)
    monkeypatch.setattr(plan_mod, "hash", lambda _: 0, raising=False)  # every key collides
    colliding = plan_rows(rows, CharTok(), causal=True, max_len=None)

    def before(plan, q) -> tuple[int, ...]:  # the tokens a query's logits follow
        return tuple(plan.seqs[q.seq][: len(plan.seqs[q.seq]) - q.from_end + 1])

    def read(plan):
        return [[(before(plan, q), q.token) for q in qs] for r in plan.rows for qs in r.queries]

    assert read(colliding) == read(honest)
    assert sorted(colliding.seqs) == sorted(honest.seqs)
    assert (1, 99, 100) in {p for qs in read(honest) for p, _ in qs}  # "cd" read its own prompt
