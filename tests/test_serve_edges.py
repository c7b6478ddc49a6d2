"""Results stay with their request, and the server holds under hostile input: per-input errors
from the planner, safe templates, configurable limits (413 naming the limit), JSON errors only,
and a property-based fuzz of every endpoint's body."""

import asyncio
import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import TinyTokenizer, tiny_model

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from attncache import Scorer, UserError  # noqa: E402
from attncache.serve import Engine, RequestError, ServeConfig, create_app  # noqa: E402
from attncache.serve.checks import render  # noqa: E402
from attncache.serve.config import Limits  # noqa: E402
from attncache.workflows import Session  # noqa: E402

LONG = "x" * 300  # the tiny model takes 256 positions


@pytest.fixture(scope="module")
def plain():
    return Session(None, tiny_model("llama"), TinyTokenizer())


def test_one_skipped_document_never_shifts_another_requests_scores(plain):
    """Two rerank requests in one engine batch, the second holding a too-long document: the first
    gets the scores it gets alone, the second its own error naming the document. On 9cecc0c the
    first request got scores shifted by one and the second an unhandled error."""
    engine = Engine(plain, ServeConfig(memo=False))
    first = ("capital of France?", ["Paris is the capital.", "Berlin is in Germany."])
    second = ("a query", ["fine", LONG, "also fine"])
    alone = engine.rerank([first])[0]
    both = engine.rerank([second, first])
    assert isinstance(both[0], RequestError) and both[0].field == "documents[1]"
    assert both[1]["scores"] == pytest.approx(alone["scores"], abs=1e-5)
    # score and classify assemble by input too
    scored = engine.score([("p " + LONG, [" a", " b"]), ("a prompt", [" a", " b"])])
    assert isinstance(scored[0], RequestError)
    assert scored[1]["logprobs"] == pytest.approx(
        engine.score([("a prompt", [" a", " b"])])[0]["logprobs"], abs=1e-5
    )
    labels = ["neg", "pos"]
    classified = engine.classify([(LONG, labels, None), ("good", labels, None)])
    assert isinstance(classified[0], RequestError) and classified[0].field == "input"
    assert classified[1]["probs"] == pytest.approx(
        engine.classify([("good", labels, None)])[0]["probs"], abs=1e-5
    )


def test_the_python_api_refuses_rather_than_shortens(plain):
    with Scorer(plain.model, plain.tokenizer) as s:
        with pytest.raises(UserError, match=r"documents\[1\]"):
            s.rerank("q", ["short", "x" * 240])  # fits alone, not inside the rerank prompt
        with pytest.raises(UserError, match=r"input\[0\]"):
            s.classify([LONG, "good"], ["neg", "pos"])
        assert len(s.rerank("q", ["a", "b", "c"])) == 3


def test_rerank_is_validated_on_the_prompt_it_runs(plain):
    """A document that fits alone but not inside the rerank prompt is a 400 naming it; on
    9cecc0c it passed validation and shifted the batch."""
    with TestClient(create_app(plain)) as c:
        r = c.post("/v1/rerank", json={"query": "q", "documents": ["short", "x" * 240]})
        assert r.status_code == 400 and r.json()["error"]["field"] == "documents[1]"
        ok = c.post("/v1/rerank", json={"query": "q", "documents": ["short", "long enough"]})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 2


def test_templates_substitute_text_and_nothing_else():
    assert render("{text} {x}", text="a") == "a {x}"
    assert render("{text.__class__} {text:>9} {text}", text="a") == "{text.__class__} {text:>9} a"
    assert render("{query}|{document}", query="{document}", document="d") == "{document}|d"


def test_hostile_templates_and_paths_get_json_answers(plain):
    with TestClient(create_app(plain)) as c:
        for tpl in (
            "{text} {x}",
            "{text.__class__.__mro__} {text}",
            "{text:>99999999}{text}",
            "{0}{text}",
        ):
            r = c.post(
                "/v1/classify", json={"input": "fine", "labels": ["a", "b"], "template": tpl}
            )
            assert r.status_code == 200, (tpl, r.text)
        r = c.post("/v1/classify", json={"input": "x", "labels": ["a", "b"], "template": "{x}"})
        assert r.status_code == 400 and r.json()["error"]["field"] == "template"
        # found by the fuzz: a lone surrogate in the echoed ``model`` made the response unencodable
        body = json.dumps({"input": "0", "model": "\ud800"})
        r = c.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json()["model"] == "model"
        for r in (c.get("/nope"), c.get("/v1/score")):
            assert r.status_code in (404, 405) and "error" in r.json()


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/score", {"prompt": "a \ud800", "choices": [" x", " y"]}, "prompt"),
        ("/v1/score", {"prompt": "a", "choices": [" x", " \udfff"]}, "choices[1]"),
        ("/v1/embeddings", {"input": ["fine", "\ud800"]}, "input[1]"),
        ("/v1/rerank", {"query": "\ud800 q", "documents": ["d"]}, "query"),
        ("/v1/rerank", {"query": "q", "documents": ["d", "\ud800"]}, "documents[1]"),
        ("/v1/classify", {"input": "\ud800", "labels": ["a", "b"]}, "input"),
    ],
)
def test_a_lone_surrogate_in_any_text_is_a_400_naming_its_field(plain, path, body, field):
    """JSON may carry a lone surrogate (``\\ud800``), which no UTF-8 tokenizer takes: it is
    refused naming the field it sits in, and the server goes on."""
    with TestClient(create_app(plain)) as c:
        r = c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["field"] == field
        assert c.get("/health").json()["status"] == "ok"


class RecordingEngine:
    """Stands in for the model thread: records each batch it runs; a payload "bad" is that
    request's own error; ``gate`` (when set) holds the first batch until released."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[list[str]] = []
        self.gate = gate
        self.queue_depth = 0

    def score(self, payloads: list[str]) -> list:  # the Engine's signature
        self.batches.append(list(payloads))
        if self.gate is not None and len(self.batches) == 1:
            self.gate.wait(10)
        return [RequestError("prompt", "bad") if p == "bad" else {"echo": p} for p in payloads]


async def outcome(pending) -> tuple[str, object]:
    """("raised", the exception) or ("returned", the value): a returned error is not raised."""
    try:
        return "returned", await pending
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return "raised", e


def test_one_requests_error_in_a_batch_is_its_own():
    """Two requests batched together, one the engine cannot run: that one raises its own error
    (the route's 400), the other gets its result."""
    from attncache.serve.batcher import Batcher
    from attncache.serve.metrics import Metrics

    engine = RecordingEngine()

    async def main():
        b = Batcher(engine, ServeConfig(max_wait_ms=200, max_batch=8), Metrics())
        b.start()
        try:
            return await asyncio.gather(
                outcome(b.submit("score", "bad")), outcome(b.submit("score", "good"))
            )
        finally:
            await b.stop()

    (how_bad, bad), (how_good, good) = asyncio.run(main())
    assert engine.batches == [["bad", "good"]]  # one batch
    assert how_bad == "raised" and isinstance(bad, RequestError) and bad.field == "prompt"
    assert (how_good, good) == ("returned", {"echo": "good"})


def test_a_request_that_timed_out_in_the_queue_is_never_run():
    """A request that waited past ``timeout_s`` behind a long batch gets its 504 and is dropped
    from the next batch: the model never runs it for nobody, and the next request runs."""
    from attncache.serve.batcher import Batcher
    from attncache.serve.metrics import Metrics

    gate = threading.Event()
    engine = RecordingEngine(gate)

    async def main():
        b = Batcher(engine, ServeConfig(max_wait_ms=0, timeout_s=1.0), Metrics())
        b.start()
        try:
            first = asyncio.ensure_future(outcome(b.submit("score", "first")))
            while not engine.batches:  # the first batch holds the model thread
                await asyncio.sleep(0.01)
            late = await outcome(b.submit("score", "late"))
            gate.set()
            await first
            after = await outcome(b.submit("score", "after"))  # queued behind "late"
            return late, after
        finally:
            await b.stop()

    (how_late, late), after = asyncio.run(main())
    assert how_late == "raised" and isinstance(late, TimeoutError)
    assert after == ("returned", {"echo": "after"})
    assert not any("late" in batch for batch in engine.batches)  # never reached the model


def test_limits_answer_413_naming_the_limit(plain):
    limits = Limits(
        max_client_batch_size=3, max_request_tokens=60, max_input_chars=50, max_body_bytes=2000
    )
    with TestClient(create_app(plain, ServeConfig(limits=limits))) as c:
        cases = [
            ("/v1/embeddings", {"input": ["a", "b", "c", "d"]}, "max_client_batch_size"),
            ("/v1/rerank", {"query": "q", "documents": ["d"] * 4}, "max_client_batch_size"),
            ("/v1/score", {"prompt": "p" * 51, "choices": [" a"]}, "max_input_chars"),
            ("/v1/embeddings", {"input": ["y" * 40, "z" * 40]}, "max_request_tokens"),
            ("/v1/embeddings", {"input": ["w" * 40] * 60}, "max_body_bytes"),
        ]
        for path, body, limit in cases:
            r = c.post(path, json=body)
            assert r.status_code == 413 and r.json()["error"]["field"] == limit, (body, r.text)
        assert c.post("/v1/embeddings", json={"input": ["a", "b"]}).status_code == 200


def test_a_request_at_each_limit_is_served_and_one_past_it_is_refused(plain):
    """Limits are inclusive: exactly the limit is served, one more refused (413 naming the limit;
    a text past the model's positions is a 400 naming its field)."""
    limits = Limits(max_client_batch_size=3, max_request_tokens=60, max_input_chars=50)
    with TestClient(create_app(plain, ServeConfig(limits=limits))) as c:
        embed, score, y, p = "/v1/embeddings", "/v1/score", "y" * 30, "p" * 50
        cases = [  # (path, body at the limit, one past it, the limit); one token per character
            (embed, {"input": ["a"] * 3}, {"input": ["a"] * 4}, "max_client_batch_size"),
            (score, {"prompt": p, "choices": ["a"]}, {"prompt": p + "q"}, "max_input_chars"),
            (embed, {"input": [y, y]}, {"input": [y, y + "z"]}, "max_request_tokens"),
        ]  # fmt: skip
        for path, fits, over, limit in cases:
            assert c.post(path, json=fits).status_code == 200, (path, fits)
            r = c.post(path, json={**fits, **over})
            assert r.status_code == 413 and r.json()["error"]["field"] == limit, (over, r.text)
    with TestClient(create_app(plain)) as c:  # the tiny model takes 256 positions
        assert c.post("/v1/embeddings", json={"input": "e" * 256}).status_code == 200
        r = c.post("/v1/embeddings", json={"input": "e" * 257})
        assert r.status_code == 400 and r.json()["error"]["field"] == "input"


def test_a_batch_never_holds_more_than_max_batch_requests():
    from attncache.serve.batcher import Batcher
    from attncache.serve.metrics import Metrics

    engine = RecordingEngine()

    async def main():
        b = Batcher(engine, ServeConfig(max_wait_ms=300, max_batch=2), Metrics())
        b.start()
        try:
            return await asyncio.gather(*(outcome(b.submit("score", f"r{k}")) for k in range(3)))
        finally:
            await b.stop()

    got = asyncio.run(main())
    assert got == [("returned", {"echo": f"r{k}"}) for k in range(3)]
    assert [len(batch) for batch in engine.batches] == [2, 1]


# -- fuzz -----------------------------------------------------------------------------------------
TEXT = st.text(max_size=40) | st.sampled_from(["", " ", LONG, "{text}", "{x}", "\ud800", "a\x00b"])
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**12) | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
FIELDS = {
    "/v1/embeddings": {"input": TEXT | st.lists(TEXT, max_size=4), "model": TEXT},
    "/v1/score": {"prompt": TEXT, "choices": st.lists(TEXT, max_size=4)},
    "/v1/rerank": {
        "query": TEXT,
        "documents": st.lists(TEXT, max_size=4),
        "texts": st.lists(TEXT, max_size=3),
        "top_n": st.integers(-2, 10),
        "return_documents": st.booleans(),
    },
    "/v1/classify": {
        "input": TEXT | st.lists(TEXT, max_size=3),
        "labels": st.lists(TEXT, max_size=4),
        "template": TEXT | st.just("Review: {text}\nSentiment:"),
    },
}


def body_for(path: str):
    fields = {k: st.one_of(v, JSONISH) for k, v in FIELDS[path].items()}
    return st.fixed_dictionaries({}, optional=fields) | JSONISH


@pytest.fixture(scope="module")
def client(plain):
    with TestClient(create_app(plain, ServeConfig(max_wait_ms=0))) as c:
        yield c


@pytest.mark.parametrize("path", list(FIELDS))
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_bodies_never_get_a_500(client, path, data):
    body = data.draw(body_for(path))
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, body, r.text)
    assert r.status_code == 200 or set(r.json()["error"]) == {"field", "message"}
    assert client.get("/health").json()["status"] == "ok"


def test_a_detached_server_writes_nothing_into_the_db(tmp_path):
    """``serve --no-cache`` is the plain-model baseline: on 9cecc0c it wrote its answers into the
    DB's memo, which the attached server measured next then answered from (a "45x")."""
    from tiny import random_seqs

    from attncache import AttnCache

    model, tok = tiny_model("llama"), TinyTokenizer()
    db = tmp_path / "db"
    AttnCache.build(model, tok, random_seqs(8, seed=4), db, progress=False)
    before = json.loads((db / "manifest.json").read_text())
    session = Session(AttnCache.open(db), model, tok)
    engine = Engine(session, ServeConfig(attach=False))
    assert not isinstance(engine.score([("Review: fine\nSentiment:", [" a", " b"])])[0], Exception)
    engine.close()
    after = json.loads((db / "manifest.json").read_text())
    assert after["generation"] == before["generation"] and "memo" not in after["names"]
