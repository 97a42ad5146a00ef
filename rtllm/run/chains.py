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
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from rtllm.run.config import SampleConfig, chain_seed
from rtllm.run.merge import CHAIN_STATUS, CHAINS, check_ensemble_dir, chain_dir, merge
from rtllm.run.sampling import SamplingRun, sample
from rtllm.store.manifest import atomic_write_json
HANDSHAKE_TIMEOUT_S = 600  # ranks start within seconds of each other; the model loads after


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
    check_gathered(gathered)


def check_gathered(gathered: list[dict]) -> None:
    """Every rank's {"settings", "error"}: the same ValueError on every rank unless all agree."""
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
