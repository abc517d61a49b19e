"""Run one standalone training process (world size 1, gloo) for the engine tests.

usage: python tests/engine_worker.py RUN_DIR FAULT_JSON key=value ...
FAULT_JSON: a fault spec of tests/fault_injection.py (e.g. {"event": "save", "step": N}), or null.
"""

import json
import os
import sys

from ranks import free_port

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    run_dir, fault_json, *overrides = sys.argv[1:]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    import logging

    from fault_injection import install

    from mlctl.config import load_config
    from mlctl.engine import Trainer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    install(json.loads(fault_json))
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, run_dir, rank=0, world_size=1)
    trainer.setup()
    state = trainer.fit()
    print("FINAL", json.dumps(state.__dict__))


if __name__ == "__main__":
    main()
