"""A planned run scores every choice as the plain model scores it run whole.

The planner drops each choice's last token, shares a position between choices whose tokens so
far are equal, and lets rows read sequences other rows run; the prefix tier then computes a
shared few-shot header once. None of that may move a score: per choice, the log-likelihood a
planned run reports equals the sum of log-probabilities the plain model gives the choice's tokens
when prompt + choice runs alone, in float32 (to 1e-4) and in bfloat16 (as close as bfloat16
rounding lets two forwards of different shapes be), and a row too long to run beside good ones
moves no other row's scores."""

import pytest
import torch
from tiny import TinyTokenizer, tiny_model

from attncache.data import ChoiceRow
from attncache.tasks import RunOptions, Tiers, plan_rows, run
from attncache.tasks.tokenize import PairEncoder
from attncache.tiers import PrefixTier

HEADER = "Answer each question with a word.\nQ: sky? A: blue\nQ: grass? A: green\n"
CHOICES = [
    (" cat", " car", " c", " dog"),  # shared first tokens, a one-token choice
    (" b", " x"),  # one-token choices only
    (" snow", " sn", " rain storm", " sun"),
]
MAX_LEN = 150


def rows() -> list[ChoiceRow]:
    out = [
        ChoiceRow(HEADER + f"Q: item {i}? A:", CHOICES[i % len(CHOICES)], i % 2) for i in range(6)
    ]
    out.insert(3, ChoiceRow(HEADER * 4 + "Q: long? A:", CHOICES[0], 0))  # longer than MAX_LEN
    return out


def peaky(model):
    """Sharper next-token distributions than a random init gives, so that reading the wrong
    position moves a score by far more than rounding does."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(16.0)
    return model


@torch.no_grad()
def whole_choice_scores(model, data: list[ChoiceRow]) -> list[list[float]]:
    """Per row, each choice's log-likelihood from one plain forward of prompt + choice."""
    pairs = PairEncoder(TinyTokenizer())
    out = []
    for row in data:
        head, conts = pairs.choices(row.prompt, list(row.choices))
        scores = []
        for cont in conts:
            ids = torch.tensor([head + cont])
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            scores.append(sum(float(lp[len(head) - 1 + j, t]) for j, t in enumerate(cont)))
        out.append(scores)
    return out


def planned_scores(model, data: list[ChoiceRow], tier: bool) -> tuple[dict, list[str]]:
    """Per data row index, each choice's log-likelihood from one planned run (and the rows the
    planner skipped)."""
    plan = plan_rows(data, TinyTokenizer(), causal=True, max_len=MAX_LEN)
    tiers = Tiers(prefix=PrefixTier(model)) if tier else Tiers()
    out = run(model, TinyTokenizer(), plan, RunOptions(batch_size=3, progress=False), tiers)
    assert (sum(out.prefix_tokens) > len(HEADER) * 3) == tier  # the header was computed once
    scores = {
        r.index: [sum(out.logprobs[(q.seq, q.from_end, q.token)] for q in qs) for qs in r.queries]
        for r in plan.rows
    }
    return scores, plan.skipped


@pytest.mark.parametrize("flush", [1, None])  # the head after every batch, or once at the end
# mistral_flagged: windows past which every prompt runs, under a flag the model ignores
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "mistral_flagged"])
def test_planned_choice_scores_equal_each_choice_run_whole(family, flush, monkeypatch):
    from attncache.tasks import scoring

    if flush is not None:
        monkeypatch.setattr(scoring, "FLUSH_POSITIONS", flush)
    data = rows()
    fp32 = peaky(tiny_model(family))
    reference = whole_choice_scores(fp32, data)
    bf16 = peaky(tiny_model(family)).to(torch.bfloat16)
    reference_bf16 = whole_choice_scores(bf16, data)
    # how far two bfloat16 forwards may sit apart: the reference's own distance from float32
    rounding = max(
        abs(a - b)
        for ra, rb in zip(reference, reference_bf16, strict=True)
        for a, b in zip(ra, rb, strict=True)
    )
    spread = max(abs(a - b) for r in reference for a in r for b in r)
    assert spread > 20 * rounding  # the test can tell a misread position from rounding
    for model, ref, tol in ((fp32, reference, 1e-4), (bf16, reference_bf16, 2 * rounding)):
        for tier in (True, False):
            got, skipped = planned_scores(model, data, tier)
            assert len(skipped) == 1 and "longer than" in skipped[0]
            assert sorted(got) == [i for i in range(len(data)) if i != 3]
            for i, scores in got.items():
                assert scores == pytest.approx(ref[i], abs=tol), (model.dtype, tier, i)
                best = max(range(len(scores)), key=scores.__getitem__)
                margin = sorted(ref[i])[-1] - sorted(ref[i])[-2]
                if margin > 2 * tol:  # answers: the plain model's, wherever rounding cannot tie
                    assert ref[i][best] == max(ref[i]), (model.dtype, tier, i)
