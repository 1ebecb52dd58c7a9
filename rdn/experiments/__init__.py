"""Experiments built on the library: the end-to-end pipeline behind ``rdn pipeline`` and its report.

- :mod:`rdn.experiments.config`: :class:`ExperimentConfig`, the pipeline's typed settings, and its presets;
- :mod:`rdn.experiments.runner`: a small runner of resumable steps (a step is skipped when its outputs exist);
- :mod:`rdn.experiments.pipeline`: the pipeline's steps (pretrain → nest → fine-tune → exit outputs →
  nesting order → policy → evaluation → ablations → report), built on :mod:`rdn.steps`, the same
  functions ``rdn pretrain`` / ``nest`` / ``finetune`` call;
- :mod:`rdn.experiments.report`: ``report.md`` and ``tradeoff.png`` rendered from the step outputs
  (``evaluation.json`` and the rest), apart from the computation.

Nothing in the library core imports this package.
"""
