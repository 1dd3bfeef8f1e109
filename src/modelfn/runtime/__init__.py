"""The torch-free inference core that Lambda loads.

Imports here are limited to the standard library, numpy, onnxruntime, Powertools
and (where a model needs it) tokenizers. A test imports the handlers with torch
made unimportable to keep it so.
"""
