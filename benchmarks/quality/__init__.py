"""Quality benchmark: PAT vs. post-hoc hidden-width pruning on a real model (``python -m benchmarks.quality``).

One concept per module:

* :mod:`.commonsense` - task folders laid out like ``shared/data/commonsense`` (parsing, prompts, batches)
* :mod:`.wikitext`    - the WikiText-2 concatenate-and-chunk perplexity windows
* :mod:`.training`    - the one training loop every tuned method shares (equal budget by construction)
* :mod:`.evaluation`  - perplexity, log-likelihood multiple-choice accuracy with standard errors, sizes
* :mod:`.posthoc`     - the post-hoc cut by the package's activation criterion (peft_pat.calibration)
* :mod:`.torch_pruning_peer` - the external peer (Torch-Pruning hidden-width pruning)
* :mod:`.methods`     - how each compared method builds its final stock model
* :mod:`.cli`         - the command line and its presets
* :mod:`.runner`      - orchestration: sparsities, model reuse, results JSON, checkpoint evaluation
* :mod:`.plotting`    - accuracy / perplexity vs. sparsity PNG
"""
