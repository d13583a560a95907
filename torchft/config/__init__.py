"""YAML configs for recipes: load + overrides, ``_component_`` instantiation, validation, saving.

Interface used by recipe scripts (see docs/configs.md for the full story)::

    from omegaconf import DictConfig
    from torchft.config import check_start, instantiate, load_config, log_and_save_config, recipe_main, validate

    def main(cfg: DictConfig) -> None:            # every recipe script defines this
        check_start(cfg)                           # what the run would refuse, before any work (one line)
        model = instantiate(cfg.model)             # builds `_component_` with the node's other keys
        optimizer = instantiate(cfg.optimizer, model.parameters())   # caller args merged over config's
        ...
        log_and_save_config(cfg, cfg.output_dir)   # every check passed: writes torchft_config.yaml

    if __name__ == "__main__":
        recipe_main(main)   # python recipes/x.py --config NAME [key=value ...]; `tune run` calls main(cfg)

- ``load_config(name_or_path, overrides=()) -> DictConfig``: a shipped name
  (``llama3_2/1B_lora_single_device``, ``quickstart/lora_single_device``, ``generation``) or a YAML path.
  Overrides: ``key=value``, nested ``optimizer.lr=1e-4``, lists ``tasks=[a,b]``, ``~key`` removes,
  ``+key=value`` adds a key the config lacks, ``model=pkg.other_builder`` (or ``model._component_=...``)
  swaps a component and keeps its arguments. A key that does not exist is refused (ConfigError, a
  ValueError, one line with a did-you-mean). ``${output_dir}`` interpolations resolve when read.
- ``instantiate(node, *args, **kwargs)``: imports ``node._component_`` and calls it with ``*args``, then
  the node's other keys (nested ``_component_`` nodes instantiated first), with ``kwargs`` winning
  over the config's. Errors name the key path: ``dataset._component_: cannot import 'torchft.data.foo'
  ...``, ``optimizer: unexpected argument 'lrr' for torch.optim.AdamW (did you mean 'lr'?)``.
- ``validate(cfg, accepted_keys=None, runtime_args=None) -> list[str]``: all problems at once, empty
  when valid. Components import; their arguments bind (``bind_partial`` for unknown arguments, and every
  required argument must be in the config unless the recipe passes it at call time: ``RUNTIME_ARGS``
  lists those per key, e.g. ``optimizer: params``, ``dataset: tokenizer``; a registry entry adds its own);
  unknown top-level keys get a did-you-mean against ``accepted_keys``
  (``torchft.registry.accepted_keys(recipe)``); and ``start_problems`` below.
- ``start_problems(cfg, runtime_args=None) -> list[str]`` / ``check_start(cfg)``: what a recipe refuses
  at its start, found without loading anything: a key the recipe sets itself (``loss.compile``,
  ``lr_scheduler.num_training_steps``), batch sizes and ``max_steps`` / ``epochs``, a local dataset's
  ``data_files``, ``output_dir`` (writable; a fresh run into a used one) and the resume folder.
  ``check_start`` raises them all as one ConfigError line; a recipe calls it first, and writes
  nothing (``log_and_save_config`` included) until every start check has passed.
- ``log_and_save_config(cfg, output_dir) -> Path``: logs the resolved config and writes
  ``<output_dir>/torchft_config.yaml`` (rank 0 only in distributed runs).
- ``recipe_main(main)``: the script's command line (``--config``, overrides, ``--debug``), one-line errors.

Importing this package imports OmegaConf only, never torch: ``tune --help`` stays fast.
"""
from torchft.config._instantiate import import_component, instantiate
from torchft.config._load import COMPONENT_KEY, ConfigError, apply_overrides, load_config, shipped_config_names
from torchft.config._recipe import SAVED_CONFIG_NAME, log_and_save_config, recipe_main
from torchft.config._start import RUNTIME_ARGS, check_start, start_problems
from torchft.config._validate import validate

__all__ = [
    "COMPONENT_KEY",
    "ConfigError",
    "RUNTIME_ARGS",
    "SAVED_CONFIG_NAME",
    "apply_overrides",
    "check_start",
    "import_component",
    "instantiate",
    "load_config",
    "log_and_save_config",
    "recipe_main",
    "shipped_config_names",
    "start_problems",
    "validate",
]
