"""Entry point: ``python run.py stage=<name> [group=option ...] [key=value ...]``.

Hydra composes conf/config.yaml over the schema in rlhf/config.py, the launcher starts the ranks
the hardware profile asks for, and the stage named by ``stage.name`` runs (rlhf/stages).
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rlhf.config import quote_numeric_choices, register

register()
sys.argv = [sys.argv[0], *quote_numeric_choices(sys.argv[1:])]


def resolve(cfg: DictConfig) -> DictConfig:
    """Which model each role trains (``rlhf.config.resolve_models``), from the command line's
    overrides and group choices; a single run's directory is named after the model really trained."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from rlhf.config import resolve_models, validate
    from rlhf.console import quiet_libraries

    quiet_libraries(str(cfg.hardware.accelerator))
    hc = HydraConfig.get()
    resolve_models(cfg, list(hc.overrides.task), dict(hc.runtime.choices))
    validate(cfg)  # every choice and cross-field rule, before anything loads or launches
    out = Path(hc.runtime.output_dir)
    if not cfg.run_dir and hc.mode == RunMode.RUN and out.parent.name != cfg.model.name \
            and out.parent.parent.name == str(cfg.stage.name):
        target = out.parent.parent / str(cfg.model.name) / out.name
        target.parent.mkdir(parents=True, exist_ok=True)
        out.rename(target)  # Hydra's files (.hydra/, the open log) move with it
        cfg.run_dir = str(target)
    return cfg


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from launchers import launch

    try:
        cfg = resolve(cfg)
    except Exception as err:  # a bad setting: a single run stops here; a sweep job becomes a failed row
        from launchers.local import in_multirun, record_failure, resolve_paths

        if not in_multirun():
            raise
        cfg = resolve_paths(cfg)
        record_failure(Path(cfg.run_dir), err, cfg)
        return None
    try:
        metrics = launch(cfg)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop: one line, no traceback
        print("interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
    # Sweepers (Optuna) read the objective from the return value.
    return metrics.get("objective") if isinstance(metrics, dict) else None


if __name__ == "__main__":
    main()
