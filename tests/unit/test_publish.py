"""``modelfn.publish``: a model from a notebook, through the same build and gates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import modelfn
from modelfn.errors import ConfigError, ExportParityError, UsageError
from modelfn.runtime.model import load
from modelfn.store import open_store
from tests import own_models


class Noisy(torch.nn.Module):
    """Not a function of its input: no export of it can be faithful."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


@pytest.mark.slow
def test_publish_module_with_an_example(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh()).eval()
    store = tmp_path / "store"
    version = modelfn.publish(module, name="tanh-net", example=torch.randn(4, 3),
                              store=str(store))
    assert version == "1"
    assert modelfn.publish(module, name="tanh-net", example=torch.randn(2, 3),
                           store=str(store)) == "2"
    served = load(open_store(str(store)), "tanh-net", "2")
    assert [t.to_dict() for t in served.manifest.inputs] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 3]}]
    x = np.random.default_rng(1).standard_normal((9, 3)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    assert np.abs(served.run({"input": x})["output"] - expected).max() < 1e-5
    assert served.manifest.export["parity"]["passed"]


def test_publish_onnx_path_with_processing_keys(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(own_models.masked_sum_graph())
    version = modelfn.publish(tmp_path / "m.onnx", name="ms", store=str(tmp_path / "s"),
                              max_batch=8)
    served = load(open_store(str(tmp_path / "s")), "ms", version)
    assert served.max_batch == 8
    assert [t.name for t in served.manifest.outputs] == ["kept", "any", "score"]


def test_publish_runs_the_gate_and_publishes_nothing_when_it_fails(tmp_path: Path) -> None:
    with pytest.raises(ExportParityError, match="parity gate failed"):
        modelfn.publish(Noisy(), name="noisy", example=torch.zeros(2, 3),
                        store=str(tmp_path / "s"))
    assert not (tmp_path / "s" / "models" / "noisy").exists()


def test_publish_mistakes_name_the_keyword(tmp_path: Path) -> None:
    module = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError) as info:
        modelfn.publish(module, name="m", example=torch.zeros(1, 2), store=str(tmp_path),
                        atoll=1e-3)
    assert info.value.message.startswith("modelfn.publish(name='m'): atoll: unknown key")
    with pytest.raises(UsageError, match="needs inputs="):
        modelfn.publish(module, name="m", store=str(tmp_path))
    with pytest.raises(UsageError, match="not a int"):
        modelfn.publish(42, name="m", store=str(tmp_path))
    with pytest.raises(UsageError, match="torch.complex64"):
        modelfn.publish(module, name="m", example=torch.zeros(1, 2, dtype=torch.complex64),
                        store=str(tmp_path))


@pytest.mark.slow
def test_declared_range_bounds_the_gate_and_the_api(tmp_path: Path) -> None:
    """An index input: the gate feeds values inside its range (an embedding of 5 rows
    would fail on others), and the API refuses values outside it with 422 instead of
    onnxruntime wrapping -1 to the last row."""
    from modelfn.errors import InvalidInput
    from modelfn.runtime.protocol import InferRequest, RequestInput

    torch.manual_seed(0)
    module = torch.nn.Embedding(5, 2).eval()
    version = modelfn.publish(module, name="lookup", store=str(tmp_path / "s"), inputs=[
        {"name": "idx", "datatype": "INT64", "shape": [-1, 3], "range": [0, 4]}])
    served = load(open_store(str(tmp_path / "s")), "lookup", version)
    assert served.manifest.inputs[0].range == (0, 4)
    ok, _ = served.validate(InferRequest([RequestInput("idx", "INT64", [1, 3], [0, 2, 4])]))
    assert np.allclose(served.run(ok)["output"][0], module.weight.detach().numpy()[[0, 2, 4]])
    for bad in ([0, 1, 5], [-1, 0, 0]):
        with pytest.raises(InvalidInput, match=r"values must lie in \[0, 4\]"):
            served.validate(InferRequest([RequestInput("idx", "INT64", [1, 3], bad)]))
