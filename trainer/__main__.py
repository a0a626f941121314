"""The training job:

[torchrun --nproc_per_node N] python -m hyperdistill.trainer --config deploy/configs/trainer.cpu.yaml [key=value ...]
"""

import argparse
import json
import logging
import os

from hyperdistill.common.config import config_to_dict, load_config
from hyperdistill.common.log import setup_logging
from hyperdistill.trainer.config import TrainerConfig
from hyperdistill.trainer.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the HyperLoRA hypernetwork against the teacher service.")
    parser.add_argument("--config", required=True, help="YAML config (see deploy/configs/)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. teacher.addresses=[host:50051]")
    args = parser.parse_args()
    config = load_config(TrainerConfig, args.config, args.overrides)
    setup_logging(config.log_level)
    if os.environ.get("RANK", "0") == "0":
        logging.getLogger(__name__).info("config: %s", json.dumps(config_to_dict(config)))
    trainer = Trainer(config)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
