"""``python -m hyperdistill.teacher_service --config deploy/configs/teacher.cpu.yaml [key.sub=value ...]``"""

import argparse
import asyncio
import json
import logging

from hyperdistill.common.config import config_to_dict, load_config
from hyperdistill.common.log import setup_logging
from hyperdistill.teacher_service.config import TeacherConfig
from hyperdistill.teacher_service.server import serve


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a teacher's top-K log-probs over gRPC.")
    parser.add_argument("--config", required=True, help="YAML config (see deploy/configs/)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. server.port=50052 engine.kind=hf")
    args = parser.parse_args()
    config = load_config(TeacherConfig, args.config, args.overrides)
    setup_logging(config.log_level)
    logging.getLogger(__name__).info("config: %s", json.dumps(config_to_dict(config)))
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
