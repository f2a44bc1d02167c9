"""One process of the 2-process DDP test (tests/test_engine.py), started by torch.distributed.run.

Usage: python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT_DIR

Each process builds the tiny model from a *different* seed (DDP must make them equal), trains
it for two one-epoch stages ("heads", then "all") on 8 images (2 steps per epoch and process)
with a checkpoint every step, writing into OUT_DIR/out_rank<r> (only rank 0 may write there),
and saves its initial and final state dicts and its step history to OUT_DIR/*_rank<r>.*.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from tiny_training import TinyShapes, tiny_config  # noqa: E402

from mrcnn_edu.engine import Stage, TrainConfig, seed_everything, train  # noqa: E402
from mrcnn_edu.model import build_mask_rcnn  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    config = tiny_config()
    seed_everything(100 + rank)
    model = build_mask_rcnn(config)
    torch.save(model.state_dict(), out / f"initial_rank{rank}.pt")
    train_config = TrainConfig(lr=0.02, batch_size=2, warmup_iters=1, device="cpu", checkpoint_every=1,
                               stages=(Stage(1, 2.0, "heads"), Stage(1)))
    history = train(model, config, TinyShapes(8, flip=True), None, train_config, out / f"out_rank{rank}",
                    progress=False)
    torch.save(model.state_dict(), out / f"state_rank{rank}.pt")
    (out / f"steps_rank{rank}.json").write_text(json.dumps(history.steps))


if __name__ == "__main__":
    main()
