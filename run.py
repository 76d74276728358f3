"""Entry point: ``python run.py stage=<name> [group=option ...] [key=value ...]``.

Hydra composes conf/config.yaml over the schema in rlhf/config.py, the launcher starts the ranks
the hardware profile asks for, and the stage named by ``stage.name`` runs (rlhf/stages).
"""
import sys

import hydra
from omegaconf import DictConfig

from rlhf.config import quote_numeric_choices, register

register()
sys.argv = [sys.argv[0], *quote_numeric_choices(sys.argv[1:])]


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from launchers import launch

    try:
        metrics = launch(cfg)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop: one line, no traceback
        print("interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
    # Sweepers (Optuna) read the objective from the return value.
    return metrics.get("objective") if isinstance(metrics, dict) else None


if __name__ == "__main__":
    main()
