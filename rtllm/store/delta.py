"""Compressed samples: the offset from the start checkpoint, quantized blockwise with bitsandbytes.

A sample x is stored as q = Q(x - x_start), where Q quantizes each block of `block_size`
offsets to a code over its absmax (bitsandbytes `quantize_blockwise`, 8-bit dynamic code, or
`quantize_4bit` with the NF4 code); x_start is stored once per ensemble, in OUT/start/ (a
`from_pretrained` directory, in the samples' own dtype). Why offsets: posterior samples sit
close to the start, so a code over the offset's absmax is far finer than one over the weight's.
Measured (docs/benchmarks.md, "Issue 13"): delta8 rounds an offset to ~1% of its scale, bf16
rounds a weight to ~0.2% of the weight, so delta8 is the more accurate whenever the offset is
under ~15% of the weight, at about half the bytes of bf16.

Stored file (samples/NNNNNN/delta.safetensors): per changed floating tensor `NAME.q` (uint8
codes; two NF4 codes per byte) and `NAME.absmax` (float32 per block); any other changed tensor
as itself under NAME. A tensor absent from the file equals the start's (frozen parameters).
"""
from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rtllm.store.manifest import WEIGHTS, _fsync_dir, sha256_file

DELTA_WEIGHTS = "delta.safetensors"
START = "start"  # OUT/start/: the start checkpoint of a compressed ensemble
PLAIN = "safetensors"  # the uncompressed format: each sample a from_pretrained directory
# bits per offset and default block size; 256 x 8 bit: absmax adds 4/256 bytes per weight
# (1.016 B/weight, 0.51x bf16); NF4 uses bitsandbytes' usual 64 (0.56 B/weight, 0.28x bf16).
FORMATS = {"delta8": (8, 256), "nf4": (4, 64)}
SAMPLE_FORMATS = (PLAIN, *FORMATS)
# A safetensors header entry: {"NAME.q":{"dtype":"U8","shape":[N],"data_offsets":[A,B]}} with
# names as long as GPT-2's (~40 characters) and 12-digit offsets is ~100 bytes; 160 is generous.
HEADER_BYTES_PER_TENSOR = 160


@dataclass(frozen=True)
class DeltaCodec:
    """Quantizes offsets from the start. `format`: delta8 or nf4; `block_size`: offsets per
    absmax (a power of two, 64..4096, as bitsandbytes' CPU and CUDA kernels accept)."""

    format: str = "delta8"
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"sample format must be one of {', '.join(FORMATS)} to compress, "
                             f"got {self.format!r}")
        if self.block_size is None:
            object.__setattr__(self, "block_size", FORMATS[self.format][1])
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 64 or b > 4096 or b & (b - 1):
            raise ValueError(f"block_size must be a power of two in 64..4096, got {b!r}")

    def encode(self, tensors: dict[str, Tensor], start: dict[str, Tensor]
               ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """(stored tensors, {"max_abs_error", "rms_error"}): the error of the reconstruction
        (in the sample's dtype) against `tensors`, measured here, so the manifest's bound is
        exact for this sample."""
        import bitsandbytes.functional as bnb  # heavy import, only when a sample is compressed

        stored: dict[str, Tensor] = {}
        max_err, sq_err, n = 0.0, 0.0, 0
        for name, x in tensors.items():
            x0 = start[name]
            n += x.numel()
            if torch.equal(x, x0):
                continue  # frozen or unchanged: the start's
            if not x.is_floating_point():
                stored[name] = x.contiguous()
                continue
            offset = x.float().flatten() - x0.float().flatten()
            if self.format == "delta8":
                q, state = bnb.quantize_blockwise(offset, blocksize=self.block_size)
            else:
                q, state = bnb.quantize_4bit(offset, blocksize=self.block_size, quant_type="nf4")
            stored[name + ".q"], stored[name + ".absmax"] = q.flatten(), state.absmax.float()
            err = (self._decode_one(q, state.absmax, x0) .float() - x.float()).flatten()
            max_err = max(max_err, err.abs().max().item())
            sq_err += err.double().square().sum().item()
        return stored, {"max_abs_error": max_err, "rms_error": math.sqrt(sq_err / max(n, 1))}

    def decode(self, stored: dict[str, Tensor], start: dict[str, Tensor]) -> dict[str, Tensor]:
        """The sample's tensors (the start's dtypes) from the stored ones."""
        out = {}
        for name, x0 in start.items():
            if name + ".q" in stored:
                out[name] = self._decode_one(stored[name + ".q"], stored[name + ".absmax"], x0)
            else:
                out[name] = stored.get(name, x0)
        return out

    def _decode_one(self, q: Tensor, absmax: Tensor, x0: Tensor) -> Tensor:
        import bitsandbytes.functional as bnb

        if self.format == "delta8":
            code = _dynamic_code(q.device)
            offset = bnb.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=self.block_size)
        else:
            state = bnb.QuantState(absmax=absmax, shape=torch.Size([x0.numel()]),
                                   blocksize=self.block_size, quant_type="nf4", dtype=torch.float32,
                                   code=bnb.get_4bit_type("nf4", device=q.device))
            offset = bnb.dequantize_4bit(q.view(-1, 1), state)
        return (x0.float() + offset.view(x0.shape)).to(x0.dtype)

    def manifest_fields(self) -> dict:
        return {"format": self.format, "file": DELTA_WEIGHTS, "block_size": self.block_size,
                "start": START}

    def bytes_per_weight(self) -> float:
        return FORMATS[self.format][0] / 8 + 4 / self.block_size

    def stored_bytes(self, numel: int) -> int:
        """Bytes a changed tensor of `numel` floating weights takes in delta.safetensors: its
        codes, one float32 absmax per block, and HEADER_BYTES_PER_TENSOR of the file's header."""
        bits, blocks = FORMATS[self.format][0], -(-numel // self.block_size)
        return -(-numel * bits // 8) + 4 * blocks + 2 * HEADER_BYTES_PER_TENSOR


_CODES: dict[str, Tensor] = {}


def _dynamic_code(device: torch.device) -> Tensor:
    """bitsandbytes' 8-bit dynamic map (what quantize_blockwise uses when given no code)."""
    import bitsandbytes.functional as bnb

    key = str(device)
    if key not in _CODES:
        _CODES[key] = bnb.create_dynamic_map().to(device)
    return _CODES[key]


def sample_disk_bytes(model: torch.nn.Module, sample_format: str, *, fp32: bool = False) -> tuple[int, int]:
    """(bytes per sample, bytes once) of a run sampling `model` in `sample_format`: a plain
    sample is the whole state dict (fp32: in float32); a compressed one the codes of the
    weights that require grad (frozen ones equal the start's and are not stored), with the
    start stored once. An upper bound (tied weights are counted twice)."""
    plain = sum(t.numel() * (4 if fp32 else t.element_size()) for t in model.state_dict().values())
    if sample_format == PLAIN:
        return plain, 0
    codec = DeltaCodec(sample_format)
    return sum(codec.stored_bytes(p.numel()) for p in model.parameters() if p.requires_grad), plain


def codec_for(entry: dict) -> DeltaCodec | None:
    """The codec of a manifest entry; None for a plain sample."""
    fmt = entry.get("format", PLAIN)
    if fmt == PLAIN:
        return None
    if fmt not in FORMATS:
        raise ValueError(f"sample {entry.get('index')} has format {fmt!r}, which this rtllm does "
                         f"not read (known: {', '.join(SAMPLE_FORMATS)}); upgrade rtllm")
    return DeltaCodec(fmt, entry["block_size"])


# -- the start checkpoint -------------------------------------------------------------------------
def ensure_start(out_dir: Path, config_json: bytes, tensors: dict[str, Tensor]
                 ) -> tuple[dict[str, Tensor], str]:
    """Write OUT/start/ (config.json + model.safetensors) unless it exists; (the start's
    tensors as stored, their file's sha256). A resumed run keeps the existing start, so every
    sample of the ensemble is an offset from the same bytes."""
    final = Path(out_dir) / START
    if not (final / WEIGHTS).is_file():
        tmp = Path(out_dir) / f".tmp-{START}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            with open(tmp / "config.json", "wb") as f:
                f.write(config_json)
                f.flush()
                os.fsync(f.fileno())
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / WEIGHTS,
                      metadata={"format": "pt"})
            with open(tmp / WEIGHTS, "rb") as f:
                os.fsync(f.fileno())
            if final.exists():  # a start directory without its weights: a crash mid-write
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(final.parent)
    stored = load_file(final / WEIGHTS)
    if stored.keys() != tensors.keys():
        raise ValueError(f"{final / WEIGHTS} holds other tensors than this model has; it belongs "
                         f"to another run: write to a new directory")
    return stored, sha256_file(final / WEIGHTS)


def read_start(out_dir: Path, entry: dict, verify: bool) -> dict[str, Tensor]:
    path = Path(out_dir) / entry["start"] / WEIGHTS
    if not path.is_file():
        raise ValueError(f"{path} is missing but sample {entry['index']} is stored as an offset "
                         f"from it; restore the start directory (it cannot be re-created)")
    if verify and sha256_file(path) != entry["start_sha256"]:
        raise ValueError(f"{path} does not match the sha256 the manifest records for the start "
                         f"of sample {entry['index']}: the file changed; restore it")
    return load_file(path)
