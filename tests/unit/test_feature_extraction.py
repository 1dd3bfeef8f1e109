"""``task = "feature-extraction"``: a transformers folder served as token states, for
any number of texts (more than 8 run in chunks by length): each text's states are
transformers' for that text alone, zeros past its last token."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from modelfn.export.build import build
from modelfn.project import load_project
from modelfn.store import open_store
from tests import own_models
from tests.conftest import write_project
from tests.unit.test_api_handler import fresh_api
from tests.unit.test_raw_tensors import call

WORDS = ["the", "parcel", "never", "arrived", "and", "support", "did", "not", "answer", "my",
         "mails", "for", "a", "whole", "week", "so", "I", "asked", "for", "a", "refund",
         "which", "came", "quickly"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fx")
    own_models.tiny_roberta(root)
    config = write_project(root, {"states": {"source": "transformers", "path": "tiny-roberta",
                                             "task": "feature-extraction", "max_length": 32,
                                             "atol": 1e-4}})
    log: list[str] = []
    build("states", open_store(str(root / "store")), project=load_project(config),
          log=log.append)
    (root / "build.log").write_text("\n".join(log))
    return root


@pytest.fixture(scope="module")
def api(folder: Path) -> ModuleType:
    with pytest.MonkeyPatch.context() as mp:
        return fresh_api(folder / "store", mp)


def reference(folder: Path, text: str) -> np.ndarray:
    """transformers' token states of ``text`` alone, tokenized as the runtime does."""
    import torch
    from tokenizers import Tokenizer
    from transformers import RobertaModel

    tok = Tokenizer.from_file(str(folder / "tiny-roberta" / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(32)
    ids = torch.tensor([tok.encode(text).ids])
    model = RobertaModel.from_pretrained(str(folder / "tiny-roberta")).eval()
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return states[0].numpy()


def test_the_build_ships_the_token_states_as_the_graph_computes_them(folder: Path) -> None:
    log = (folder / "build.log").read_text()
    assert "parity gate passed" in log
    assert "fp32 ships: no candidates (raw tensor outputs and no eval rows" in log


@pytest.mark.parametrize("n", [1, 8, 9, 40])
def test_any_number_of_texts_gets_each_its_own_states(folder: Path, api: ModuleType,
                                                      n: int) -> None:
    rng = np.random.default_rng(n)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) for _ in range(n)]
    doc = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [n], "data": texts}]}
    status, body, _ = call(api, "states", doc)
    assert status == 200, body
    o = next(o for o in body["outputs"] if o["name"] == "last_hidden_state")
    states = np.asarray(o["data"], dtype=np.float32).reshape(o["shape"])
    wants = [reference(folder, t) for t in texts]
    assert states.shape == (n, max(len(w) for w in wants), 32)
    for i, want in enumerate(wants):
        assert np.allclose(states[i, :len(want)], want, atol=1e-4), (i, texts[i])
        assert not states[i, len(want):].any()  # zeros past the text's last token
    truncated = next(o for o in body["outputs"] if o["name"] == "truncated")["data"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tiny-roberta" / "tokenizer.json"))
    tok.no_padding()
    assert truncated == [len(tok.encode(t).ids) > 32 for t in texts]


def test_an_int8_candidate_is_gated_on_the_token_states(folder: Path, tmp_path: Path) -> None:
    """Listed, dynamic int8 is tried on the served token states (by length, in chunks)."""
    config = write_project(folder, {"states": {
        "source": "transformers", "path": "tiny-roberta", "task": "feature-extraction",
        "max_length": 32, "atol": 1e-4, "optimize": ["dynamic-int8"]}})
    log: list[str] = []
    manifest = build("states", open_store(str(tmp_path / "s")), project=load_project(config),
                     log=log.append)
    (attempt,) = manifest.optimization["attempts"]
    assert attempt["candidate"] == "dynamic-int8" and attempt["quality"]["rows"] > 0, attempt
    assert "relative error" in attempt["quality"]["summary"]
