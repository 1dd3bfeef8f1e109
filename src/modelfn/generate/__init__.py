"""Generative decoders: a user's GPT-style causal LM, built, gated and served.

- :mod:`modelfn.export.generate` (the build side, with torch): a ``task =
  "text-generation"`` transformers folder → onnxruntime-genai's model builder (KV
  cache; fp32, and int8/int4 weight-only MatMulNBits) → gates (fp32: greedy tokens
  identical to transformers' ``generate``; int8/int4: perplexity, greedy agreement,
  decode speed) → a versioned bundle;
- :mod:`modelfn.generate.decoder`: the runtime (onnxruntime-genai, no torch): one
  loaded decoder, token streaming with stop strings, limits and cancellation;
- :mod:`modelfn.generate.measure`: perplexity, greedy agreement and decode speed
  (onnxruntime alone: the gates and ``modelfn eval``);
- :mod:`modelfn.generate.params`: the sampling parameters both APIs take, checked once;
- :mod:`modelfn.generate.routes`: the Open Inference Protocol's generate extension and
  the OpenAI-compatible completions and chat completions, streamed as server-sent
  events;
- :mod:`modelfn.generate.lambda_stream`: Lambda response streaming for Python (the
  function's own Runtime API loop, response mode ``streaming``).
"""

TASK = "text-generation"
PLATFORM = "onnxruntime_genai"
