"""scripts/bench_demo.py: the figures block it writes, and the README quoting the same figures
as docs/benchmarks.md (issue 16, item 5)."""
import re
import sys

import pytest

from repo_paths import REPO, SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import bench_demo  # noqa: E402

TIMES = {"pretrain": 100.4, "sample": 60.2, "evaluate": 30.7,
         "summary": {"nll_bma": 5.0412, "nll_baseline": 5.0851, "nll_samples_mean": 5.1,
                     "mean_epistemic": 0.05, "mean_epistemic_ood": 0.06, "auroc_ood_epistemic": 0.9331}}


def block_of(text: str) -> str:
    return re.search(re.escape(bench_demo.BEGIN) + "(.*?)" + re.escape(bench_demo.END), text, re.S).group(1)


def test_block_and_readme_line_carry_the_same_figures():
    block = bench_demo.benchmark_block(TIMES, 200.0, "a machine", "abc1234", "2026-12-03")
    line = bench_demo.readme_line(TIMES, 200.0)
    for figure in ("5.0412", "5.0851", "0.933"):
        assert figure in block and figure in line
    assert "pretraining 100 s, sampling 60 s, evaluation 31 s" in block and "3.3 min" in line
    replaced = bench_demo.replace_block(f"before\n{bench_demo.BEGIN}old{bench_demo.END}\nafter", line)
    assert replaced == f"before\n{line}\nafter"
    with pytest.raises(ValueError, match="no .* block"):
        bench_demo.replace_block("no markers here", line)


def test_readme_quotes_the_figures_of_docs_benchmarks():
    readme = block_of((REPO / "README.md").read_text())
    bench = block_of((REPO / "docs" / "benchmarks.md").read_text())
    nll_bma, nll_start = re.search(r"average (\d\.\d{4}) nats/token vs (\d\.\d{4})", readme).groups()
    auroc = re.search(r"AUROC (\d\.\d{3})", readme).group(1)
    assert f"| {nll_bma} |" in bench and f"| {nll_start} |" in bench
    assert f"| {auroc} (target" in bench
