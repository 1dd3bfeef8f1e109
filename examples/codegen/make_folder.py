"""Writes model/: the decoder's architecture (config.json) and its tokenizer, a
byte-level BPE of 2,048 tokens trained on the corpus the model trains on (the standard
library's email package). Run once; its output is committed (the weights are not: they
come from `modelfn train codegen`).

    python make_folder.py
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def main() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    files = sorted(str(p) for p in Path(str(resources.files("email"))).rglob("*.py"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=512)
    fast.chat_template = CHATML
    out = HERE / "model"
    fast.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=192, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    config.save_pretrained(out)
    print(json.dumps(sorted(p.name for p in out.iterdir())))


if __name__ == "__main__":
    main()
