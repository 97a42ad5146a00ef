"""Reading an output directory: the samples listed in ensemble.json, checked and loaded lazily.

Samples are addressed by their sample index (the NNNNNN of samples/NNNNNN, unique across
chains), not by their position in the manifest, so an index means the same sample whatever
subset (`unmasked()`) is being looked at.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from safetensors.torch import load_file
from torch import Tensor

from rtllm.store.delta import codec_for, read_start
from rtllm.store.writer import WEIGHTS, Manifest, sha256_file


class Ensemble:
    """The complete samples of an output directory.

    Construction checks that every listed sample directory holds config.json and
    model.safetensors and, with `verify`, that each file's sha256 matches the manifest; any
    problem is a ValueError naming the file. Iteration yields (entry, state_dict) one sample at
    a time; state dicts hold the stored keys (tied weights such as GPT-2's lm_head.weight are
    omitted, as in save_pretrained), `load_model` gives a complete model. Compressed samples
    (rtllm.store.delta: offsets from OUT/start/) are expanded on read, so readers need not care.
    """

    def __init__(self, out_dir: Path | str, verify: bool = True) -> None:
        self.out_dir = Path(out_dir)
        manifest = Manifest.load(self.out_dir)
        self.config: dict = manifest.config
        self._entries = manifest.entries
        self._starts: dict[str, dict[str, Tensor]] = {}  # of compressed samples, each read once
        self._verify = verify
        for entry in self._entries:
            _check_entry(self.out_dir, entry, verify)

    @classmethod
    def _subset(cls, parent: "Ensemble", entries: list[dict]) -> "Ensemble":
        sub = cls.__new__(cls)
        sub.out_dir, sub.config, sub._entries = parent.out_dir, parent.config, entries
        sub._starts, sub._verify = parent._starts, parent._verify
        return sub

    @property
    def entries(self) -> list[dict]:
        """Manifest entries, sorted by (chain, index)."""
        return [dict(e) for e in self._entries]

    @property
    def chains(self) -> list[int]:
        """The chain ids of the samples, sorted (several in a merged multi-chain directory)."""
        return sorted({e["chain"] for e in self._entries})

    @property
    def indices(self) -> list[int]:
        return [e["index"] for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[dict, dict[str, Tensor]]]:
        for entry in self._entries:  # one sample in memory at a time
            yield dict(entry), self.state_dict(entry["index"])

    def unmasked(self) -> "Ensemble":
        """The samples not marked `masked` by the run."""
        return Ensemble._subset(self, [e for e in self._entries if not e["masked"]])

    def entry(self, index: int) -> dict:
        for e in self._entries:
            if e["index"] == index:
                return dict(e)
        raise KeyError(f"no sample with index {index} in {self.out_dir} (indices: "
                       f"{_brief(self.indices)}); indices are sample indices, not positions")

    def path(self, index: int) -> Path:
        """The model directory of sample `index`."""
        return self.out_dir / self.entry(index)["path"]

    def state_dict(self, index: int) -> dict[str, Tensor]:
        entry = self.entry(index)
        codec = codec_for(entry)
        if codec is None:
            return load_file(self.path(index) / WEIGHTS)
        return codec.decode(self.stored(index), self.start(entry))

    def stored(self, index: int) -> dict[str, Tensor]:
        """The tensors as stored (a compressed sample's codes), without expanding them."""
        entry = self.entry(index)
        return load_file(self.path(index) / entry.get("file", WEIGHTS))

    def start(self, entry: dict) -> dict[str, Tensor]:
        """The start checkpoint a compressed sample is an offset from (read once)."""
        if entry["start"] not in self._starts:  # a merged ensemble has one start per chain
            self._starts[entry["start"]] = read_start(self.out_dir, entry, self._verify)
        return self._starts[entry["start"]]

    def load_model(self, index: int, dtype=None, **from_pretrained_kwargs):
        """AutoModelForCausalLM.from_pretrained of sample `index`; dtype None: the stored one."""
        from transformers import AutoModelForCausalLM  # heavy import, only when a model is built

        if dtype is not None:
            from_pretrained_kwargs["dtype"] = dtype
        entry = self.entry(index)
        if codec_for(entry) is None:
            return AutoModelForCausalLM.from_pretrained(self.path(index), **from_pretrained_kwargs)
        if from_pretrained_kwargs.get("device_map") is not None:
            raise ValueError(f"sample {index} is compressed ({entry['format']}); device_map cannot "
                             f"place it: use rtllm.EnsembleForCausalLM.from_ensemble(max_memory=...) or "
                             f"rtllm export --format hf first")
        # The start's directory builds the model; the expanded sample replaces its weights.
        model = AutoModelForCausalLM.from_pretrained(self.out_dir / entry["start"],
                                                     **from_pretrained_kwargs)
        result = model.load_state_dict(self.state_dict(index), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"sample {index} holds tensors the model does not have "
                             f"({result.unexpected_keys[:5]}); the start directory is not its own")
        return model


def load_sample(out_dir: Path | str, index: int, *, verify: bool = True, **from_pretrained_kwargs):
    """Load sample `index` (its sample index, as in samples/NNNNNN) of an output directory;
    with `verify`, only that sample's file is hashed."""
    ensemble = Ensemble(out_dir, verify=False)
    _check_entry(ensemble.out_dir, ensemble.entry(index), verify)
    return ensemble.load_model(index, **from_pretrained_kwargs)


def _check_entry(out_dir: Path, entry: dict, verify: bool) -> None:
    sample_dir = out_dir / entry["path"]
    if out_dir.resolve() not in sample_dir.resolve().parents:
        raise ValueError(f"manifest entry of sample {entry['index']} points outside {out_dir} "
                         f"({entry['path']!r}); the manifest was edited: restore it")
    # Every file of the sample is hashed in the manifest ("files"); older manifests: the weights.
    weights = entry.get("file", WEIGHTS)
    files = entry.get("files") or {weights: entry["sha256"]}
    for name in sorted({"config.json", weights} | set(files)):
        if not (sample_dir / name).is_file():
            raise ValueError(f"{sample_dir / name} is missing but {out_dir / 'ensemble.json'} "
                             f"lists sample {entry['index']}; restore the file or resume the run "
                             f"to re-create the sample")
    if verify:
        for name, digest in sorted(files.items()):
            actual = sha256_file(sample_dir / name)
            if actual != digest:
                raise ValueError(f"{sample_dir / name} has sha256 {actual} but the manifest "
                                 f"records {digest}: the file changed after it was written; "
                                 f"restore it or resume the run to re-create sample {entry['index']} "
                                 f"(verify=False skips this check)")


def _brief(indices: list[int]) -> str:
    return str(indices) if len(indices) <= 10 else f"{indices[:5]} ... {indices[-5:]}"
