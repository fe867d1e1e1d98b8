"""The training loop shared by `irtrain sft` and `irtrain dpo`.

- `objective.py`  the `Objective` protocol a command plugs into the loop (SFT, DPO, ...)
- `batching.py`   packed rows -> optimizer steps -> per-rank micro-batches (deterministic)
- `packed.py`     the padding-free forward of a packed micro-batch
- `schedule.py`   the learning-rate schedule, a pure function of the step
- `strategy.py`   single process vs DeepSpeed (the only module that imports deepspeed)
- `checkpoint.py` atomic checkpoints, exact resume, SIGTERM/SIGINT
- `reference.py`  precomputed reference log-probs cached beside the shards
- `metrics.py`    metrics.jsonl (the progress display: `irtrain.display`)
- `trackers.py`   --report-to: TensorBoard, Trackio, W&B, MLflow, with TRL's metric names
- `loop.py`       `train(cfg, objective)`: the loop itself, top to bottom
"""
