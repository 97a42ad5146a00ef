"""Independent chains, one per process, written into one ensemble directory and merged.

Layout of a multi-chain directory DIR (docs/sampling.md, "Several chains"):

    DIR/chains/chain-003/            chain 3 in the single-chain layout (samples/, ensemble.json,
                                     checkpoints/, log-chain-003.jsonl, run.json) ...
    DIR/chains/chain-003/chain.json  ... plus who runs it and whether it finished
    DIR/ensemble.json                the merged manifest (`merge`): every chain's complete samples
    DIR/tokenizer.json ...           so DIR loads with rtllm.Ensemble and `rtllm evaluate`

Under torchrun, rank r runs chain `first_chain + r`. The ranks meet once, at start, to check
that they were given the same settings (a gloo all_gather of a small dict), then never again:
each chain writes only its own directory, and the merge reads files. A rank that dies cannot
hang the others or corrupt their files (torchrun then stops the group; every chain keeps its
complete samples and checkpoint, and `--resume` continues each one).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from rtllm.config import SampleConfig
from rtllm.manifest import MANIFEST, SAMPLES, WEIGHTS, Manifest, atomic_write_json, copy_tokenizer, sha256_file

CHAINS = "chains"
CHAIN_STATUS = "chain.json"
# Merged sample index = chain * INDEX_STRIDE + the sample's index within its chain: stable when
# a re-merge adds samples of a running chain (renumbering 0..N-1 would shift every later chain's
# indices), and readable (3000002 = chain 3, sample 2). A chain's own index has 6 digits anyway
# (samples/NNNNNN).
INDEX_STRIDE = 1_000_000
# May differ between merged chains; every other manifest config field must agree.
PER_CHAIN_KEYS = ("chain", "seed", "dt", "L", "init")
HANDSHAKE_TIMEOUT_S = 600  # ranks start within seconds of each other; the model loads after
_LOCK = ".merge.lock"


def chain_seed(seed: int, chain: int) -> int:
    """The seed chain `chain` runs with (sampler noise and minibatch order), from (seed, chain).

    Chain 0 uses `seed` itself, so a single-chain run is unchanged. Chain k > 0 uses the first
    8 bytes (little-endian) of sha256("rtllm-chain:{seed}:{chain}"), shifted right by one bit
    (a 63-bit seed is valid everywhere a seed goes). A pure function: chain k of a torchrun
    launch and `rtllm sample --chain k` alone are the same chain.
    """
    if chain == 0:
        return seed
    digest = hashlib.sha256(f"rtllm-chain:{seed}:{chain}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def chain_name(chain: int) -> str:
    """The chain's directory relative to the ensemble directory (POSIX, as in manifests)."""
    return f"{CHAINS}/chain-{chain:03d}"


def chain_dir(out_dir: Path | str, chain: int) -> Path:
    return Path(out_dir) / chain_name(chain)


# -- one process, one chain -------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch (from its environment variables)."""
    rank: int
    world_size: int
    local_rank: int
    restart_count: int  # torchrun's TORCHELASTIC_RESTART_COUNT: > 0 after a failed group restarted

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Launch | None":
        """None outside torchrun (no RANK and WORLD_SIZE)."""
        env = os.environ if env is None else env
        if "RANK" not in env and "WORLD_SIZE" not in env:
            return None
        values = {}
        for name, default in (("RANK", None), ("WORLD_SIZE", None), ("LOCAL_RANK", "0"),
                              ("TORCHELASTIC_RESTART_COUNT", "0")):
            text = env.get(name, default)
            if text is None or not text.strip().isdigit():
                raise ValueError(f"environment variable {name}={text!r} is not a non-negative integer; "
                                 f"launch several chains with torchrun (it sets RANK, WORLD_SIZE, "
                                 f"LOCAL_RANK), or unset RANK and WORLD_SIZE to run one chain")
            values[name] = int(text)
        if values["RANK"] >= values["WORLD_SIZE"]:
            raise ValueError(f"RANK={values['RANK']} is not below WORLD_SIZE={values['WORLD_SIZE']}; "
                             f"launch with torchrun")
        return cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"],
                   values["TORCHELASTIC_RESTART_COUNT"])


def check_ensemble_dir(out_dir: Path) -> None:
    """ValueError if `out_dir` holds a single-chain run (chains must not be mixed into it)."""
    from rtllm.sampling import RUN_MARKER

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


def handshake(settings: dict, launch: Launch, error: str | None) -> None:
    """The one collective: every rank learns every rank's settings and start-up error.

    Raises the same ValueError on every rank when one rank cannot start or was given different
    settings, so no rank waits for another. gloo whatever the device: it is a few hundred bytes
    once, and NCCL would cost a communicator on every GPU for nothing.
    """
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size,
                            timeout=datetime.timedelta(seconds=HANDSHAKE_TIMEOUT_S))
    try:
        gathered: list = [None] * launch.world_size
        dist.all_gather_object(gathered, {"settings": settings, "error": error})
    finally:
        dist.destroy_process_group()  # no collective after this: the chains are independent
    for rank, got in enumerate(gathered):
        if got["error"]:
            raise ValueError(f"rank {rank} cannot start: {got['error']}")
    ref = gathered[0]["settings"]
    for rank, got in enumerate(gathered[1:], start=1):
        theirs = got["settings"]
        diff = sorted(k for k in ref.keys() | theirs.keys() if ref.get(k) != theirs.get(k))
        if diff:
            shown = "; ".join(f"{k}: {theirs.get(k)!r} vs {ref.get(k)!r}" for k in diff)
            raise ValueError(f"rank {rank} was started with other settings than rank 0 ({shown}); "
                             f"every rank must get the same command line (the chain id comes "
                             f"from the rank): fix the launch command")


def start_ranks(out: Path, launch: Launch | None, settings: dict, *, resume: bool, overwrite: bool,
                check: Callable[[bool, bool], None] | None = None) -> tuple[bool, bool]:
    """What every rank does before writing anything; returns the (resume, overwrite) to use.

    A group torchrun restarted after a failure resumes every chain from its checkpoint. `out`
    must be fit for chains (and pass `check(resume, overwrite)`); under torchrun the ranks then
    meet in the one handshake, so a rank that cannot start stops them all with its error.
    """
    if launch is not None and launch.restart_count > 0:
        resume, overwrite = True, False
    error = None
    try:
        check_ensemble_dir(out)
        if check is not None:
            check(resume, overwrite)
    except ValueError as e:
        error = str(e)
    if launch is not None:
        handshake({**settings, "resume": resume, "overwrite": overwrite}, launch, error)
    elif error:
        raise ValueError(error)
    return resume, overwrite


def rank_device(device: str, launch: Launch | None) -> str:
    """One GPU per rank (cuda:LOCAL_RANK) when the device is 'auto' or 'cuda' and CUDA exists."""
    import torch

    if launch is None or device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    return f"cuda:{launch.local_rank}"


def run_sample(cfg: SampleConfig, *, first_chain: int | None = None, resume: bool = False,
               overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """`rtllm sample`: one chain in cfg.out (the single-chain layout), or, under torchrun or with
    `first_chain`, chain first_chain + rank in cfg.out/chains/chain-NNN; then a merge attempt.
    Returns the directory the chain was written to."""
    from rtllm.sampling import sample

    launch = Launch.from_env()
    out = cfg.out_dir
    if launch is None and first_chain is None:
        if (out / CHAINS).is_dir():
            raise ValueError(f"{out} holds the chains of a multi-chain run; pass --chain K to add or "
                             f"resume chain K there, or choose another --out")
        return sample(cfg, resume=resume, overwrite=overwrite, log=log)
    if first_chain is not None and (isinstance(first_chain, bool) or not isinstance(first_chain, int)
                                    or first_chain < 0):
        raise ValueError(f"--chain must be an integer >= 0, got {first_chain!r}")
    first = first_chain or 0
    resume, overwrite = start_ranks(out, launch, {**cfg.to_json(), "first_chain": first}, resume=resume,
                                    overwrite=overwrite)
    chain = first + (launch.rank if launch else 0)
    ccfg = dataclasses.replace(cfg, chain=chain, out=str(chain_dir(out, chain)),
                               device=rank_device(cfg.device, launch))
    say = (lambda m: log(f"[chain {chain}] {m}")) if launch is not None else log
    expected = None if launch is None else list(range(first, first + launch.world_size))
    run_chain(ccfg, expected_chains=expected, resume=resume, overwrite=overwrite, log=say)
    try:  # never waits on another chain: it merges what is on disk now
        report = merge(out, verify=False)  # each sample was verified by re-reading when written
        say(report.summary())
    except ValueError as e:
        say(f"merge skipped ({e}); run `rtllm merge {out}` when the chains are done")
    return ccfg.out_dir


def run_chain(ccfg: SampleConfig, *, expected_chains: list[int] | None, resume: bool, overwrite: bool,
              log: Callable[[str], None]) -> None:
    """Run chain ccfg.chain in its own directory ccfg.out, with its chain.json status file.

    expected_chains: every chain id of the launch this chain belongs to (so a merge can name
    the ones that never started), or None for a chain started on its own."""
    import torch

    from rtllm.sampling import SamplingRun

    chain, cfg, say = ccfg.chain, ccfg, log
    run = SamplingRun(ccfg, resume=resume, overwrite=overwrite, log=say)
    # CPU runs are byte-reproducible at the same torch thread count (LayerNorm's backward sums
    # its weight gradient per thread): recorded, so that a re-run can match it.
    status = {"chain": chain, "seed": cfg.seed, "chain_seed": chain_seed(cfg.seed, chain),
              "steps": cfg.steps, "expected_samples": run.n_samples, "host": socket.gethostname(),
              "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
              "launch": None if expected_chains is None else {"chains": list(expected_chains)}}
    atomic_write_json(ccfg.out_dir / CHAIN_STATUS, {**status, "status": "running"})
    run.run()
    atomic_write_json(ccfg.out_dir / CHAIN_STATUS, {**status, "status": "finished"})


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
        sample = cdir / e["path"]
        for name in ("config.json", WEIGHTS):
            if not (sample / name).is_file():
                raise ValueError(f"{sample / name} is missing but {cdir / MANIFEST} lists it; "
                                 f"resume chain {chain} to re-create the sample")
        if verify and sha256_file(sample / WEIGHTS) != e["sha256"]:
            raise ValueError(f"{sample / WEIGHTS} does not match the sha256 in {cdir / MANIFEST}: "
                             f"it changed after it was written; restore it or resume chain {chain}")
        entries.append({**e, "index": chain * INDEX_STRIDE + e["index"], "chain_index": e["index"],
                        "path": f"{chain_name(chain)}/{e['path']}"})
    return entries
