"""A prompt and its choices become tokens by lm-eval's rule (encode whole, split at the context's
length, trailing whitespace moved onto the choice), never the choice encoded alone. With a
SentencePiece-style tokenizer the two rules differ; the planner follows lm-eval's, so `eval`,
`serve` and `batch` score a choice as lm-eval does."""

import pytest
import torch
from tiny import save_tiny_hf, sentencepiece_tokenizer

from attncache.data import ChoiceRow
from attncache.tasks import plan_rows
from attncache.tasks.tokenize import PairEncoder

CONTEXTS = ["Question: what is the answer?\nAnswer:", "the cat sat on the", "Answer: "]
CHOICES = [" A", " B", " the mat", "at", " cat sat"]


def alone(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_a_choice_alone_differs_from_lm_evals_split_on_sentencepiece():
    tok = sentencepiece_tokenizer()
    pairs = PairEncoder(tok)
    differ = 0
    for ctx in CONTEXTS:
        head, conts = pairs.choices(ctx, CHOICES)
        assert head[0] == tok.bos_token_id  # the tokenizer's BOS, as lm-eval keeps it
        for c, ids in zip(CHOICES, conts, strict=True):
            whole = list(tok(ctx.rstrip() + ctx[len(ctx.rstrip()) :] + c)["input_ids"])
            assert whole[: len(head)] == head and head + ids == whole
            differ += ids != alone(tok, c)
    # " A" alone is ['▁', '▁A']: a dummy-prefix piece the model never sees after "Answer:"
    assert alone(tok, " A") != pairs.choices("Answer:", [" A"])[1][0]
    assert differ >= len(CONTEXTS)


def test_trailing_spaces_move_onto_the_choice():
    tok = sentencepiece_tokenizer()
    head, (ids,) = PairEncoder(tok).choices("Answer: ", ["A"])
    assert head == PairEncoder(tok).encode("Answer:")
    assert tok.convert_ids_to_tokens(ids) == ["▁A"]


def test_special_tokens_a_tokenizer_appends_are_not_split_into_the_choice():
    tok = sentencepiece_tokenizer(append_eos=True)
    head, (ids,) = PairEncoder(tok).choices("Answer:", [" A"])
    assert tok.eos_token_id not in head + ids
    assert tok.convert_ids_to_tokens(ids) == ["▁A"]
    # a text already starting with BOS gets no second one
    assert PairEncoder(tok).encode("<s>Answer:").count(tok.bos_token_id) == 1


def test_the_planner_uses_the_rule_for_every_choice_row():
    tok = sentencepiece_tokenizer()
    rows = [ChoiceRow(ctx, tuple(CHOICES), 0) for ctx in CONTEXTS]
    plan = plan_rows(rows, tok, causal=True, max_len=None)
    for row, r in zip(rows, plan.rows, strict=True):
        head, conts = PairEncoder(tok).choices(row.prompt, list(row.choices))
        for qs, ids in zip(r.queries, conts, strict=True):
            assert [q.token for q in qs] == ids
            for j, q in enumerate(qs):  # the tokens before each predicted one: head + ids[:j]
                seq = plan.seqs[q.seq]
                assert seq[: len(seq) - q.from_end + 1] == head + ids[:j]


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    return str(
        save_tiny_hf("llama", tmp_path_factory.mktemp("spm"), tokenizer=sentencepiece_tokenizer())
    )


def test_choice_scores_equal_lm_evals_on_a_sentencepiece_tokenizer(sentencepiece_model):
    """What `eval`/`serve` compute for a choice row is lm-eval's log-likelihood of the same
    (context, continuation) request, to 1e-4."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attncache.tasks import RunOptions, run

    del lm_eval
    tok = AutoTokenizer.from_pretrained(sentencepiece_model)
    model = AutoModelForCausalLM.from_pretrained(sentencepiece_model, dtype=torch.float32).eval()
    rows = [ChoiceRow(ctx, tuple(CHOICES), 0) for ctx in CONTEXTS]
    plan = plan_rows(rows, tok, causal=True, max_len=None)
    out = run(model, tok, plan, RunOptions(batch_size=4, progress=False))
    ours = [
        sum(out.logprobs[(q.seq, q.from_end, q.token)] for q in qs)
        for r in plan.rows
        for qs in r.queries
    ]
    hf = HFLM(pretrained=sentencepiece_model, batch_size=4, device="cpu", dtype="float32")
    args = [(ctx, c) for ctx in CONTEXTS for c in CHOICES]
    reqs = [Instance("loglikelihood", {}, a, idx=i) for i, a in enumerate(args)]
    theirs = [lp for lp, _ in hf.loglikelihood(reqs)]
    assert ours == pytest.approx(theirs, abs=1e-4)
