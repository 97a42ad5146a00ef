"""Samples on disk: the writer, the manifest, the run log, and the ensemble reader.

`writer` writes each sample as a `from_pretrained` directory (safetensors, off the hot loop,
atomically); `manifest` is ensemble.json (hashes, per-sample records) and the atomic-write
helpers; `runlog` the JSON-lines log of a run; `ensemble` reads an ensemble back lazily
(`rtllm.Ensemble`, `rtllm.load_sample`).

`delta` stores a sample as its offset from the start, quantized with bitsandbytes; `export`
expands any ensemble into plain directories.

May import: torch, safetensors, bitsandbytes (when compressing or expanding). Knows nothing of
samplers, runs or evaluation.
"""
