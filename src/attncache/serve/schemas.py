"""The request bodies the endpoints accept (pydantic), with an example each for ``/docs``.

Static bounds here stop absurd bodies during parsing; the limits a user sets (``config.Limits``)
are checked by the routes, which answer 413 naming the limit."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Far above any configurable limit: parsing stops here, before a limit is even checked.
HARD_MAX_ITEMS = 100_000


def _examples(*examples: dict) -> ConfigDict:
    return ConfigDict(extra="ignore", json_schema_extra={"examples": list(examples)})


Texts = str | list[str]


class EmbeddingsIn(BaseModel):
    model_config = _examples({"input": ["a gripping film", "dull and too long"]})
    input: Texts = Field(..., description="a string or a list of strings")
    model: str | None = None


class ScoreIn(BaseModel):
    model_config = _examples(
        {"prompt": "Review: a gripping film\nSentiment:", "choices": [" negative", " positive"]}
    )
    prompt: str
    choices: list[str] = Field(..., max_length=HARD_MAX_ITEMS)


class RerankIn(BaseModel):
    model_config = _examples(
        {
            "query": "what is the capital of France?",
            "documents": ["Paris is the capital of France.", "Berlin is in Germany."],
            "top_n": 2,
        }
    )
    query: str
    documents: list[str] | None = Field(
        None, max_length=HARD_MAX_ITEMS, description="the texts to rank (Cohere, vLLM)"
    )
    texts: list[str] | None = Field(
        None, max_length=HARD_MAX_ITEMS, description="the same, as TEI names it"
    )
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    model: str | None = None


class ClassifyIn(BaseModel):
    model_config = _examples(
        {
            "input": ["a gripping film"],
            "labels": ["negative", "positive"],
            "template": "Review: {text}\nSentiment:",
        }
    )
    input: Texts
    labels: list[str] = Field(
        ..., max_length=HARD_MAX_ITEMS, description="the classes; probabilities come in this order"
    )
    template: str | None = Field(
        None,
        description="how a text becomes a prompt: {text} marks it; every other character, "
        "braces included, is literal",
    )
    model: str | None = None
