"""What the recipes share: the phases of a fine-tuning run, as functions with plain arguments.

Modules (imported on demand, so ``import torchft.training`` stays cheap):

- ``setup``: checks made before training (output folder, sizes, architecture, tokenizer) and loading
  weights into a model built on ``meta``, one layer at a time.
- ``precision``: device and dtype selection (bf16 / fp32) with clear errors.
- ``optim``: AdamW (fused on CUDA), optimizer-in-backward, gradient clipping.
- ``lr_schedule``: cosine / linear / constant schedules with warm-up that save and restore.
- ``activations``: activation checkpointing and activation offloading applied to a built model.
- ``compile``: per-layer ``torch.compile``.
- ``wiring``: from a config's values to a running loop (start, model build on one device or FSDP2,
  loaders, resume, save, loop), with plain arguments, for SFT and other losses alike.
- ``loop``: the training loop (metrics, validation, save cadence, stop handling), shared by recipes
  on one device and many.
- ``steps``: the train step (token-weighted gradient accumulation), the validation loss, NaN and
  out-of-memory messages, run length from ``max_steps`` / ``epochs``.
- ``state`` and ``checkpointing``: the resumable training state and the weights of a step folder.
- ``rng``: capture / restore of the python, numpy, torch and CUDA random states.
- ``signals``: SIGINT / SIGTERM turned into "save, then stop".
- ``metric_logging``: stdout, JSONL, TensorBoard and Weights & Biases loggers.
- ``throughput``: tokens/s, peak memory, the MFU estimate and the progress bar.
- ``samples``: greedy sample generations before / after fine-tuning.
- ``quickstart``: the quickstart's tiny base model, made deterministically on disk.
"""
