"""codegen's training callable: a small Llama-style decoder (model/config.json) trained
from scratch on the standard library's email package as a code-completion corpus (next-
token prediction over windows of its source, tokenized by model/tokenizer.json). The
run's checkpoint is the weights; the build puts them in the folder and exports it."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch


def main(ctx) -> None:
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    p = ctx.params
    folder = ctx.spec.path("path")
    corpus = Path(ctx.data_path("corpus"))
    files = sorted(corpus.rglob("*.py"))
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    ctx.describe_data(source=f"{corpus} ({len(files)} files)",
                      fingerprint=hashlib.sha256(text.encode()).hexdigest()[:16],
                      characters=len(text))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    split = int(len(ids) * 0.95)  # the last 5%: validation loss
    train, valid = ids[:split], ids[split:]
    config = LlamaConfig.from_pretrained(str(folder))
    model = LlamaForCausalLM(config).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.01)
    steps, seq, batch = int(p["steps"]), int(p["seq"]), int(p["batch_size"])
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(ctx.seed)

    def windows(data: torch.Tensor, n: int) -> torch.Tensor:
        starts = torch.randint(0, len(data) - seq - 1, (n,), generator=gen)
        return torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).to(ctx.device)

    for step in range(1, steps + 1):
        model.train()
        x = windows(train, batch)
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                v = windows(valid, 16)
                val = model(input_ids=v[:, :-1], labels=v[:, :-1]).loss.item()
            ctx.log(step=step, loss=loss.item(), val_loss=val, val_perplexity=math.exp(val))
    ctx.save_checkpoint(model)
