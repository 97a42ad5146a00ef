"""Merge: the samples of every chain in DIR/chains listed in one manifest, DIR/ensemble.json.

Also the layout of a multi-chain directory (docs/sampling.md, "Several chains"): where chain k
lives, its status file, and how merged sample indices are numbered. The merge reads files only:
it never waits on a running chain, and a re-merge adds what has finished since.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from rtllm.run.config import chain_seed
from rtllm.store.manifest import MANIFEST, RUN_MARKER, SAMPLES, WEIGHTS, Manifest, copy_tokenizer, sha256_file

CHAINS = "chains"
CHAIN_STATUS = "chain.json"
# Merged sample index = chain * INDEX_STRIDE + the sample's index within its chain: stable when
# a re-merge adds samples of a running chain (renumbering 0..N-1 would shift every later chain's
# indices), and readable (3000002 = chain 3, sample 2). A chain's own index has 6 digits anyway
# (samples/NNNNNN).
INDEX_STRIDE = 1_000_000
# May differ between merged chains; every other manifest config field must agree. micro_batch
# changes only the rounding of a gradient's sum, and a chain may have backed off to a smaller one.
PER_CHAIN_KEYS = ("chain", "seed", "dt", "L", "init", "micro_batch")
_LOCK = ".merge.lock"




def chain_name(chain: int) -> str:
    """The chain's directory relative to the ensemble directory (POSIX, as in manifests)."""
    return f"{CHAINS}/chain-{chain:03d}"


def chain_dir(out_dir: Path | str, chain: int) -> Path:
    return Path(out_dir) / chain_name(chain)


def check_ensemble_dir(out_dir: Path) -> None:
    """ValueError if `out_dir` holds a single-chain run (chains must not be mixed into it)."""

    single = [n for n in (RUN_MARKER, SAMPLES) if (out_dir / n).exists()]
    if (out_dir / MANIFEST).is_file() and not _is_merged(out_dir):
        single.append(MANIFEST)
    if single:
        raise ValueError(f"{out_dir} holds a single-chain run ({', '.join(single)}); several chains "
                         f"write into a directory of their own: choose another --out")


def _is_merged(out_dir: Path) -> bool:
    try:
        return "merge" in Manifest.load(out_dir).config
    except ValueError:
        return False


# -- merge ------------------------------------------------------------------------------------------
@dataclass
class ChainState:
    chain: int
    dir: str  # relative to the ensemble directory
    status: str  # finished | running | stopped | running-or-stopped | not-started | missing
    n_samples: int
    expected_samples: int | None
    seed: int | None = None  # the --seed it was given; it runs with chain_seed(seed, chain)
    chain_seed: int | None = None
    dt: float | None = None

    def describe(self) -> str:
        expected = "?" if self.expected_samples is None else self.expected_samples
        return f"chain {self.chain}: {self.status}, {self.n_samples}/{expected} samples"


@dataclass
class MergeReport:
    out_dir: Path
    chains: list[ChainState]
    n_samples: int

    @property
    def incomplete(self) -> list[ChainState]:
        return [c for c in self.chains if c.status != "finished"]

    def summary(self) -> str:
        merged = [c for c in self.chains if c.n_samples]
        text = (f"merged {self.n_samples} samples of {len(merged)} chain(s) into "
                f"{self.out_dir / MANIFEST}")
        if self.incomplete:
            text += "; not finished: " + "; ".join(c.describe() for c in self.incomplete)
        return text


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_status(cdir: Path) -> dict | None:
    import json

    try:
        return json.loads((cdir / CHAIN_STATUS).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{cdir / CHAIN_STATUS} cannot be read ({e}); resume the chain to rewrite "
                         f"it") from None


def _chain_state(chain: int, manifest: Manifest | None, status: dict | None) -> ChainState:
    n = len(manifest.entries) if manifest else 0
    if status is None:
        state = "not-started"
    elif status.get("status") == "finished":
        state = "finished"
    elif status.get("host") == socket.gethostname():
        state = "running" if _pid_alive(int(status.get("pid", -1))) else "stopped"
    else:
        state = "running-or-stopped"
    expected = status.get("expected_samples") if status else None
    config = manifest.config if manifest else {}
    seed = config.get("seed")
    return ChainState(chain, chain_name(chain), state, n, expected, seed,
                      None if seed is None else chain_seed(seed, chain), config.get("dt"))


def _merge_lock(out_dir: Path):
    """An exclusive file lock, so that the last merge to run writes the newest view (every rank
    merges when it finishes). Released by the kernel if the process dies: cannot hang anyone."""
    import contextlib

    try:
        import fcntl
    except ImportError:  # no flock on this platform: concurrent merges may race, rerun merge
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def locked():
        with open(out_dir / _LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    return locked()


def _chain_dirs(out_dir: Path) -> dict[int, Path]:
    found = {}
    for p in sorted((out_dir / CHAINS).iterdir()):
        name = p.name.removeprefix("chain-")
        if p.is_dir() and p.name.startswith("chain-") and name.isdigit():
            found[int(name)] = p
    return found


def merge(out_dir: Path | str, *, require_all: bool = False, verify: bool = True) -> MergeReport:
    """Write out_dir/ensemble.json listing every chain's complete samples; returns a report.

    Reads each chain's manifest (samples there are complete and hash-verified when written),
    checks that the chains' settings agree except PER_CHAIN_KEYS, with `verify` re-hashes every
    sample file, and lists each sample with its chain id, merged index
    (chain * INDEX_STRIDE + index) and path into its chain directory: nothing is copied. Chains
    that have not finished contribute the samples they completed, and are reported;
    `require_all` refuses instead. Running it again later updates the merged manifest.
    """
    out = Path(out_dir)
    if not (out / CHAINS).is_dir():
        raise ValueError(f"{out / CHAINS} does not exist: nothing to merge; give the --out of a "
                         f"multi-chain run (torchrun ... rtllm sample, or rtllm sample --chain K)")
    check_ensemble_dir(out)
    with _merge_lock(out):
        dirs = _chain_dirs(out)
        manifests, statuses, expected_ids = {}, {}, set(dirs)
        for chain, cdir in dirs.items():
            statuses[chain] = _read_status(cdir)
            manifests[chain] = Manifest.load(cdir) if (cdir / MANIFEST).is_file() else None
            launch = (statuses[chain] or {}).get("launch")
            if launch:
                expected_ids |= set(launch["chains"])
        states = [_chain_state(c, manifests[c], statuses[c]) for c in sorted(dirs)]
        states += [ChainState(c, chain_name(c), "missing", 0, None)
                   for c in sorted(expected_ids - set(dirs))]
        states.sort(key=lambda s: s.chain)
        if require_all and any(s.status != "finished" for s in states):
            raise ValueError("--require-all: not every chain has finished (" + "; ".join(
                s.describe() for s in states if s.status != "finished") + "); resume those chains "
                "(--resume) or merge without --require-all")
        with_manifest = [c for c in sorted(dirs) if manifests[c] is not None]
        if not with_manifest:
            raise ValueError(f"no chain under {out / CHAINS} has written a manifest yet; merge once "
                             f"a chain has started sampling")
        ref_chain = with_manifest[0]
        common = _check_configs(manifests, with_manifest, ref_chain)
        entries = []
        for chain in with_manifest:
            entries += _merged_entries(chain, dirs[chain], manifests[chain], verify)
        copy_tokenizer(dirs[ref_chain], out)
        config = {**common, "chains": [dataclasses.asdict(s) for s in states],
                  "merge": {"index": f"chain * {INDEX_STRIDE} + index within the chain",
                            "index_stride": INDEX_STRIDE, "per_chain_keys": list(PER_CHAIN_KEYS)}}
        Manifest(out, config, entries).save()
    return MergeReport(out, states, len(entries))


def _check_configs(manifests: dict, chains: list[int], ref_chain: int) -> dict:
    ref = manifests[ref_chain].config
    common = {k: v for k, v in ref.items() if k not in PER_CHAIN_KEYS}
    seeds: dict[int, int] = {}
    for chain in chains:
        config = manifests[chain].config
        if config.get("chain") != chain:
            raise ValueError(f"{chain_name(chain)} holds chain {config.get('chain')!r} by its "
                             f"manifest; a chain directory must keep its chain's name: move it back")
        diff = sorted(k for k in (config.keys() | ref.keys()) - set(PER_CHAIN_KEYS)
                      if config.get(k) != ref.get(k))
        if diff:
            shown = "; ".join(f"{k}: {config.get(k)!r} vs {ref.get(k)!r}" for k in diff)
            raise ValueError(f"chain {chain} was sampled with other settings than chain {ref_chain} "
                             f"({shown}); merge only chains of the same posterior: remove or move "
                             f"{chain_name(chain)}, or re-run it with the same settings")
        seed = chain_seed(int(config.get("seed", 0)), chain)
        if seed in seeds:  # same noise, same batches, same start: a copy, not a second chain
            raise ValueError(f"chains {seeds[seed]} and {chain} run with the same seed {seed}; "
                             f"re-run one of them with another --seed")
        seeds[seed] = chain
    return common


def _merged_entries(chain: int, cdir: Path, manifest: Manifest, verify: bool) -> list[dict]:
    entries = []
    for e in manifest.entries:
        if e["chain"] != chain:
            raise ValueError(f"{cdir / MANIFEST} lists sample {e['index']} of chain {e['chain']}; "
                             f"a chain directory holds one chain: restore the file")
        if not 0 <= e["index"] < INDEX_STRIDE:
            raise ValueError(f"chain {chain} has sample index {e['index']} >= {INDEX_STRIDE}, which "
                             f"the merged numbering cannot hold; keep fewer samples per chain")
        sample, weights = cdir / e["path"], e.get("file", WEIGHTS)  # compressed: delta.safetensors
        for name in ("config.json", weights):
            if not (sample / name).is_file():
                raise ValueError(f"{sample / name} is missing but {cdir / MANIFEST} lists it; "
                                 f"resume chain {chain} to re-create the sample")
        for name, digest in sorted((e.get("files") or {weights: e["sha256"]}).items()) if verify else ():
            if sha256_file(sample / name) != digest:
                raise ValueError(f"{sample / name} does not match the sha256 in {cdir / MANIFEST}: "
                                 f"it changed after it was written; restore it or resume chain {chain}")
        entries.append({**e, "index": chain * INDEX_STRIDE + e["index"], "chain_index": e["index"],
                        "path": f"{chain_name(chain)}/{e['path']}",
                        **({"start": f"{chain_name(chain)}/{e['start']}"} if "start" in e else {})})
    return entries
