"""A real-data recipe sized for a 2-core CPU (about an hour on the 29 shared patients).

128x128 inputs, base width 16, depth 4 (1.94M parameters), batch 16, Adam 1e-3 with the
plateau schedule, Dice + BCE loss, per-volume z-score normalisation and the Buda et al.
augmentation; early stopping after 10 epochs without improvement. The same settings scale up
unchanged on an accelerator (raise data.image_size and model.features there).

    python run.py --config=configs/cpu.py --config.data.manual_dir=PATH --workdir=runs/cpu
    python run.py --config=configs/cpu.py --workdir=runs/cpu --mode=evaluate
    python run.py --config=configs/cpu.py --workdir=runs/cpu --mode=predict --input=P --output=O

A first recipe from the walking-skeleton run (README, Results); not yet tuned by ablation.
"""

import ml_collections

from configs import unet


def get_config() -> ml_collections.ConfigDict:
    config = unet.get_config()
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_epochs = 30
    config.learning_rate = 1e-3
    config.loss = "bce_dice"
    config.log_every_steps = 20
    config.early_stopping.patience = 10
    config.data.image_size = 128
    config.data.normalize = "zscore_volume"
    config.augment.preset = "buda2019"
    config.model.features = 16
    config.model.depth = 4
    return config
