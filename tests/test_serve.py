"""The HTTP service on tiny models: every endpoint with good and bad requests, metrics equal to true
counts, backpressure and timeouts."""

import asyncio
import json
import threading

import numpy as np
import pytest
import torch
from tiny import TinyTokenizer, random_seqs, tiny_model

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from attncache import AttnCache  # noqa: E402
from attncache.serve import ServeConfig, create_app  # noqa: E402
from attncache.workflows import Session  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog barked twice", "rain again today"]


def session(tmp_path, family="llama") -> Session:
    model = tiny_model(family)
    tok = TinyTokenizer()
    seqs = [tok(t)["input_ids"] for t in TEXTS] + random_seqs(4, seed=2)
    cache = AttnCache.build(model, tok, seqs, tmp_path / "db", progress=False)
    return Session(cache, model, tok)


def metric(text: str, name: str) -> float:
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def test_embeddings_score_health_metrics(tmp_path):
    s = session(tmp_path)
    with TestClient(create_app(s, ServeConfig(max_batch=4, max_wait_ms=20, policy="all"))) as c:
        assert c.get("/health").json()["status"] == "ok"
        r = c.post("/v1/embeddings", json={"input": TEXTS[:2], "model": "x", "extra": 1})
        assert r.status_code == 200
        body = r.json()
        assert [d["index"] for d in body["data"]] == [0, 1] and body["usage"][
            "prompt_tokens"
        ] == len(TEXTS[0]) + len(TEXTS[1])
        vec = torch.tensor(body["data"][0]["embedding"])
        assert abs(float(vec.norm()) - 1) < 1e-4 and all(d["cache_hit"] for d in body["data"])
        one = c.post("/v1/embeddings", json={"input": "something never seen"}).json()
        assert len(one["data"]) == 1 and one["data"][0]["cache_hit"] is False
        sc = c.post(
            "/v1/score", json={"prompt": TEXTS[0], "choices": [" yes", " no way"], "ignored": True}
        )
        assert sc.status_code == 200
        out = sc.json()
        assert (
            len(out["logprobs"]) == 2
            and out["choice"] in (0, 1)
            and isinstance(out["cache_hit"], bool)
        )
        assert all(lp < 0 for lp in out["logprobs"])
        m = c.get("/metrics").text
        st = s.cache.stats.as_dict()
        assert metric(m, "attncache_lookups_total") == st["lookups"] > 0
        assert (
            metric(m, "attncache_hits_total") == st["hits"]
            and metric(m, "attncache_misses_total") == st["misses"]
        )
        assert metric(m, 'attncache_requests_total{endpoint="/v1/embeddings",code="200"}') == 3
        assert metric(m, "attncache_request_seconds_count") == 4
        assert "attncache_batch_size_bucket" in m and metric(m, "attncache_store_entries") == len(
            s.cache.store
        )


def test_score_matches_the_plain_model(tmp_path):
    """With the cache detached the service's log-probabilities are the model's own."""
    s = session(tmp_path)
    with TestClient(create_app(s, ServeConfig(attach=False, prefix_bytes=None))) as c:
        out = c.post("/v1/score", json={"prompt": "abc", "choices": ["d", "ef"]}).json()
        swapped = c.post("/v1/score", json={"prompt": "abc", "choices": ["ef", "d"]}).json()
    ids = s.tokenizer("abc")["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(
            s.model(torch.tensor([ids + [1 + ord("e") % 127]])).logits[0].float(), -1
        )
    want = float(lp[-2, 1 + ord("e") % 127] + lp[-1, 1 + ord("f") % 127])
    assert abs(out["logprobs"][1] - want) < 1e-4
    # ``choice``: the best log-prob per character of the choice where a choice has several
    # tokens (lm-eval's acc_norm), in the request's order (one of the two orders puts it at 1)
    per_char = [float(lp[-2, 1 + ord("d") % 127]), want / 2]
    best = int(per_char[1] > per_char[0])
    assert (out["choice"], swapped["choice"]) == (best, 1 - best)


def test_bad_requests_name_the_field_and_the_server_goes_on(tmp_path):
    s = session(tmp_path)
    with TestClient(create_app(s)) as c:
        cases = [
            ("/v1/embeddings", {}, 422, "input"),
            ("/v1/embeddings", {"input": 5}, 422, "input"),
            ("/v1/embeddings", {"input": []}, 400, "input"),
            ("/v1/embeddings", {"input": ["ok", "  "]}, 400, "input[1]"),
            ("/v1/embeddings", {"input": "x" * 300}, 400, "input"),
            ("/v1/score", {"prompt": "hi"}, 422, "choices"),
            ("/v1/score", {"prompt": "hi", "choices": []}, 400, "choices"),
            ("/v1/score", {"prompt": "", "choices": ["a"]}, 400, "prompt"),
            ("/v1/score", {"prompt": "hi", "choices": "a"}, 422, "choices"),
        ]
        for path, body, code, fld in cases:
            r = c.post(path, json=body)
            assert r.status_code == code, (body, r.text)
            assert r.json()["error"]["field"] == fld, (body, r.json())
        assert (
            c.post(
                "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
            ).status_code
            == 422
        )
        assert c.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


def test_score_on_an_encoder_is_refused(tmp_path):
    s = session(tmp_path, "bert")
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/score", json={"prompt": "hi", "choices": ["a"]})
        assert r.status_code == 400 and r.json()["error"]["field"] == "model"
        assert (
            len(c.post("/v1/embeddings", json={"input": "hi there"}).json()["data"][0]["embedding"])
            == 64
        )


def blocked_engine(app):
    """Make the app's model worker wait on an event (released by the test): no timing
    assumptions."""
    engine = app.state.engine
    gate, started = threading.Event(), threading.Event()
    real = engine.embed

    def waiting(texts):
        started.set()
        assert gate.wait(30), "the test never released the worker"
        return real(texts)

    engine.embed = waiting
    return gate, started


def test_backpressure(tmp_path):
    """One request in the (blocked) worker and two queued: every further request gets 503 at
    once."""
    import httpx

    s = session(tmp_path)
    app = create_app(s, ServeConfig(max_batch=1, max_wait_ms=1, max_queue=2, timeout_s=30))
    gate, started = blocked_engine(app)

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t") as c,
        ):
            tasks = [
                asyncio.create_task(c.post("/v1/embeddings", json={"input": f"text {i}"}))
                for i in range(8)
            ]
            while (
                sum(t.done() for t in tasks) < 5
            ):  # the refused ones answer while the worker is blocked
                await asyncio.sleep(0.01)
            refused = [t.result().status_code for t in tasks if t.done()]
            gate.set()
            codes = [r.status_code for r in await asyncio.gather(*tasks)]
            metrics = (await c.get("/metrics")).text
        return refused, codes, metrics

    refused, codes, m = asyncio.run(burst())
    assert started.is_set() and set(refused) == {503}
    assert codes.count(503) >= 5 and codes.count(200) == 8 - codes.count(503) >= 1
    assert metric(
        m, 'attncache_requests_total{endpoint="/v1/embeddings",code="503"}'
    ) == codes.count(503)
    assert metric(
        m, 'attncache_requests_total{endpoint="/v1/embeddings",code="200"}'
    ) == codes.count(200)


def test_timeout(tmp_path):
    """A request the worker cannot answer within timeout_s gets 504; the server goes on
    afterwards."""
    s = session(tmp_path)
    app = create_app(s, ServeConfig(max_batch=1, max_wait_ms=1, timeout_s=0.2))
    gate, _ = blocked_engine(app)
    with TestClient(app) as c:
        r = c.post("/v1/embeddings", json={"input": "stuck"})  # the worker waits for the gate
        assert r.status_code == 504 and r.json()["error"]["field"] == "timeout"
        gate.set()
        assert c.post("/v1/embeddings", json={"input": "free again"}).status_code == 200
        assert (
            metric(
                c.get("/metrics").text,
                'attncache_requests_total{endpoint="/v1/embeddings",code="504"}',
            )
            == 1
        )


def test_learn_mode_inserts_misses(tmp_path):
    s = session(tmp_path)
    n0 = len(s.cache.store)
    with TestClient(create_app(s, ServeConfig(learn=True, max_wait_ms=1))) as c:
        first = c.post("/v1/embeddings", json={"input": "a brand new sentence"}).json()
        second = c.post("/v1/embeddings", json={"input": "a brand new sentence"}).json()
        assert metric(c.get("/metrics").text, "attncache_learned_total") == 1
    assert first["data"][0]["cache_hit"] is False and second["data"][0]["cache_hit"] is True
    assert len(AttnCache.open(tmp_path / "db").store) == n0 + 1


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_engine_makes_no_tensor_off_the_model_device(tmp_path, family):
    """Every batch the service builds lands on the model's device: under a default device of 'meta'
    a tensor made without it could not compute."""
    from attncache.serve import Engine

    s = session(tmp_path, family)
    # a tiny encoder DB has no two inputs of one length, so its build threshold is 0: allow the
    # repeated inputs' float noise so the hit path runs
    s.cache.db.commit_settings(threshold=max(s.cache.threshold, 1e-3))
    engine = Engine(s, ServeConfig(policy="all"))
    ids = [s.tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    want = engine.embed(ids)
    torch.set_default_device("meta")
    try:
        got = engine.embed(ids)
        scored = engine.score([(TEXTS[0], [" yes", " no"])]) if family == "llama" else None
    finally:
        torch.set_default_device(None)
        engine.close()
    assert [g["cache_hit"] for g in got] == [w["cache_hit"] for w in want] and any(
        w["cache_hit"] for w in want
    )
    assert (
        max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g["embedding"], w["embedding"]))
        < 1e-5
    )
    if scored is not None:
        assert all(lp < 0 for lp in scored[0]["logprobs"])


def test_rerank_and_classify_on_a_decoder_and_an_encoder(tmp_path):
    for family in ("llama", "bert"):
        s = session(tmp_path / family, family)
        with TestClient(create_app(s, ServeConfig(max_wait_ms=1))) as c:
            docs = ["the cat sat", "rain again", "a dog barked"]
            r = c.post(
                "/v1/rerank",
                json={
                    "query": "cat on a mat",
                    "documents": docs,
                    "top_n": 2,
                    "return_documents": True,
                },
            )
            assert r.status_code == 200, r.text
            res = r.json()["results"]
            assert len(res) == 2 and res[0]["relevance_score"] >= res[1]["relevance_score"]
            assert {x["index"] for x in res} <= {0, 1, 2} and res[0]["document"]["text"] == docs[
                res[0]["index"]
            ]
            tei = c.post("/v1/rerank", json={"query": "cat on a mat", "texts": docs}).json()[
                "results"
            ]
            assert [x["index"] for x in tei][:2] == [
                x["index"] for x in res
            ]  # TEI's field name works too
            cl = c.post(
                "/v1/classify",
                json={"input": ["great fun", "awful"], "labels": ["good", "bad", "meh"]},
            )
            assert cl.status_code == 200, cl.text
            data = cl.json()["data"]
            assert [d["index"] for d in data] == [0, 1] and all(
                abs(sum(d["probs"]) - 1) < 1e-6 for d in data
            )
            assert all(
                d["label"] == ["good", "bad", "meh"][int(np.argmax(d["probs"]))] for d in data
            )
            for body, fld in (
                ({"query": "q", "documents": []}, "documents"),
                ({"query": " ", "documents": ["a"]}, "query"),
                ({"input": "x", "labels": ["one"]}, "labels"),
                ({"input": "x", "labels": ["a", "b"], "template": "no slot"}, "template"),
            ):
                path = "/v1/rerank" if "query" in body else "/v1/classify"
                bad = c.post(path, json=body)
                assert bad.status_code == 400 and bad.json()["error"]["field"] == fld, (
                    body,
                    bad.text,
                )


def test_usage_says_what_each_tier_did(tmp_path):
    s = session(tmp_path)
    with TestClient(create_app(s, ServeConfig(max_wait_ms=1, attach=False))) as c:
        body = {"prompt": "the cat sat on the mat and", "choices": [" purred loudly", " slept"]}
        first = c.post("/v1/score", json=body).json()
        second = c.post("/v1/score", json=body).json()
        assert first["logprobs"] == second["logprobs"]
        assert first["usage"]["attncache"]["memo_hits"] == 0
        assert second["usage"]["attncache"]["memo_hits"] == 2  # both continuations answered before
        # the two continuations share the prompt: the second request was served from the memo, the
        # first computed the prompt once for both
        assert first["usage"]["attncache"]["prefix_tokens_reused"] > 0
        m = c.get("/metrics").text
        assert (
            metric(m, "attncache_memo_hits_total") == 2 and metric(m, "attncache_memo_entries") == 2
        )


def test_serve_a_model_without_a_db(tiny_hf):
    from attncache.workflows import Session

    s = Session.open(None, tiny_hf("llama"))
    with TestClient(create_app(s, ServeConfig(max_wait_ms=1))) as c:
        h = c.get("/health").json()
        assert h["entries"] == 0 and h["attached"] is False and h["prefix_cache"] is True
        r = c.post(
            "/v1/score", json={"prompt": "Review: fine\nSentiment:", "choices": [" bad", " good"]}
        )
        assert r.status_code == 200 and len(r.json()["logprobs"]) == 2
        docs = c.get("/openapi.json").json()
        for path in (
            "/v1/embeddings",
            "/v1/score",
            "/v1/rerank",
            "/v1/classify",
            "/health",
            "/metrics",
        ):
            assert path in docs["paths"]
        examples = json.dumps(docs["components"]["schemas"])
        assert "capital of France" in examples and "gripping film" in examples
