"""A user's own Trainer with Lightning's ModelParallelStrategy (run as a script: the strategy
relaunches it once per rank). ``python tests/scripts/own_trainer_sharded.py TP`` with tensor
parallel size TP on two CPU devices; prints the final step."""

import sys

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_dino import DINO
from tests.conftest import TINY_VIT, CropData

tensor_parallel = int(sys.argv[1])
strategy = ModelParallelStrategy(data_parallel_size=2 // tensor_parallel, tensor_parallel_size=tensor_parallel)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(DINO(**TINY_VIT, warmup_epochs=0, ibot_loss_weight=1.0), CropData(batch_size=4))
if trainer.is_global_zero:
    print(f"global_step {trainer.global_step}")
