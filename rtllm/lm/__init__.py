"""Hugging Face models and text: what the sampler needs to know about a language model.

`model_io` loads checkpoints and tokenizers, builds models on the meta device and prepares them
for sampling; `data` reads and packs text into token windows and minibatch orders; `loss` is the
chunked LM-head cross-entropy; `presets` the published GPT-2 configs; `pretrain` trains the
tiny built-in GPT-2 on the bundled `corpus`; `out_of_memory` tells an out-of-memory error
(as accelerate does) for the rooms that back off on one.

May import: rtllm.state.progress (progress lines), torch, transformers, tokenizers, accelerate. Knows nothing of samplers, runs or storage.
"""
