"""Token-level predictive uncertainty of an ensemble: streamed metrics, diagnostics, reports.

`streaming` runs `rtllm.evaluate` (samples streamed over token windows, the Bayesian model
average accumulated in bounded memory); `metrics` the per-token quantities (total, aleatoric,
epistemic uncertainty, NLL, calibration, OOD AUROC); `diagnostics` the convergence figures read
from the run logs; `report` the plots and the shaded-token HTML; `job` one evaluation into an
output directory, `publish` its staging, completion marker and reuse.

(Named `evaluation`, not `evaluate`, so that `rtllm.evaluate` stays the function.)
`ensemble_lm` is `rtllm.EnsembleForCausalLM` (the BMA as a causal LM, generate), `generation`
`rtllm generate`'s text and page, `offload` accelerate's dispatch and the OOM back-off.

May import: rtllm.store, rtllm.lm, rtllm.samplers (autocorrelation), rtllm.state.progress, torch,
numpy, matplotlib, accelerate, transformers.
"""
