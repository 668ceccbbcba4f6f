"""Which candidate serves which API: config lists, model kind, and 404/405 answers that expire."""

from __future__ import annotations

import orjson
import pytest

from hedge.apisupport import ALL_APIS, ApiSupport, api_url, lacks_path, model_apis
from hedge.catalog import Catalog
from hedge.config import parse_config
from hedge.demo import demo_raw_config
from hedge.dialects import EMBEDDINGS, Usage


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def catalog() -> Catalog:
    urls = {"sim-alpha": "http://x/v1", "sim-beta": "http://y/v1", "sim-gamma": "http://z/v1"}
    return Catalog(parse_config(demo_raw_config(urls)))


def err(code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": "m", "type": "invalid_request_error", "code": code, "param": param}}
    )


@pytest.mark.parametrize(
    ("status", "body", "lacking"),
    [
        (405, b"", True),
        (404, b"<html>Not Found</html>", True),
        (404, err(None), True),  # OpenAI's "Invalid URL (POST /v1/responses)"
        (404, b'{"detail": "Not Found"}', True),  # FastAPI's default
        (404, err("model_not_found", "model"), False),  # the model is unknown, not the API
        (404, err("previous_response_not_found", "previous_response_id"), False),
        (404, err(None, "model"), False),
        (400, err(), False),
        (500, b"", False),
    ],
)
def test_lacks_path(status: int, body: bytes, lacking: bool) -> None:
    assert lacks_path(status, body) is lacking


def test_demo_catalog_has_embedding_models(catalog: Catalog) -> None:
    small = catalog.resolve("openai/text-embedding-3-small")
    assert [c.provider.name for c in small.candidates] == ["sim-alpha", "sim-beta"]  # a race is possible
    m = small.candidates[0].model
    assert (m.input_usd_per_mtok, m.output_usd_per_mtok) == (0.02, 0.0)
    assert model_apis(m) == {"embeddings"}
    usage = EMBEDDINGS.usage({"usage": {"prompt_tokens": 1_000_000}})
    assert usage == Usage(1_000_000, 0)
    assert usage.cost_usd(m.input_usd_per_mtok, m.output_usd_per_mtok) == pytest.approx(0.02)
    for route in ("gammainfra/fast", "gammainfra/cheap", "gammainfra/auto"):  # no chat race gets one
        chat = ApiSupport().candidates(catalog.resolve(route).candidates, "chat")
        assert chat and all("embeddings" not in c.model.tags for c in chat)
    # gammainfra/fast holds the small embeddings model, so an embeddings request to it races two providers
    fast_emb = ApiSupport().candidates(catalog.resolve("gammainfra/fast").candidates, "embeddings")
    assert [c.endpoint for c in fast_emb] == [c.endpoint for c in small.candidates]


def test_filter_by_config_model_kind_and_learned_absence(catalog: Catalog) -> None:
    clock = Clock()
    support = ApiSupport({"sim-beta": ["chat", "embeddings"]}, lacking_ttl_s=60, clock=clock)
    fast = catalog.resolve("gammainfra/fast").candidates
    emb = catalog.resolve("openai/text-embedding-3-small").candidates
    names = lambda cs: [c.endpoint for c in cs]  # noqa: E731
    chat_kind = [c for c in fast if "embeddings" not in c.model.tags]
    assert names(support.candidates(fast, "responses")) == [
        c.endpoint for c in chat_kind if c.provider.name != "sim-beta"
    ]
    assert support.candidates(chat_kind, "embeddings") == ()  # chat models never embed
    assert support.candidates(emb, "chat") == ()  # and embedding models never chat
    assert names(support.candidates(emb, "embeddings")) == names(emb)
    # sim-alpha answers 404 for /v1/embeddings: skipped for a while, then tried again
    assert support.observe("sim-alpha", "embeddings", 404, b"Not Found")
    assert names(support.candidates(emb, "embeddings")) == ["openai/text-embedding-3-small@sim-beta"]
    assert not support.observe("sim-beta", "embeddings", 404, err("model_not_found", "model"))
    clock.t = 59.9
    assert len(support.candidates(emb, "embeddings")) == 1
    clock.t = 60.0
    assert len(support.candidates(emb, "embeddings")) == 2


def test_unknown_api_name_in_config_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown APIs"):
        ApiSupport({"p": ["chat", "images"]})
    assert ApiSupport().provider_apis == {} and "responses" in ALL_APIS


def test_api_url() -> None:
    assert api_url("http://h/v1/", "responses") == "http://h/v1/responses"
    assert api_url("http://h/v1", "embeddings") == "http://h/v1/embeddings"
