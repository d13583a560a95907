"""What the recipes share: the phases of a fine-tuning run, as functions with plain arguments.

Modules (imported on demand, so ``import torchft.training`` stays cheap):

- ``precision``: dtype selection (bf16 / fp32) with a clear error where bf16 is unsupported.
- ``optim``: AdamW (fused on CUDA), optimizer-in-backward, gradient clipping.
- ``lr_schedule``: cosine / linear with warm-up / constant schedules that save and restore.
- ``activations``: activation checkpointing and activation offloading applied to a built model.
- ``compile``: per-layer ``torch.compile``.
- ``metric_logging``: stdout, JSONL, TensorBoard and Weights & Biases loggers.
- ``throughput``: tokens/s, peak memory and the MFU estimate.
- ``rng``: capture / restore of the python, torch and CUDA random states.
- ``signals``: SIGINT / SIGTERM turned into a "stop after this step" flag.
- ``steps``: the train step (token-weighted gradient accumulation) and the validation loss.
"""
