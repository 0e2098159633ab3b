"""A real-data recipe sized for a 2-core CPU (the 29 shared patients in about half an hour).

128x128 inputs, base width 16, depth 4 (1.94M parameters), batch 16, Adam 1e-3 with the
plateau schedule, Dice + BCE loss, the notebook's x/255 scaling and the Buda et al.
augmentation; early stopping after 10 epochs without improvement. About 27 minutes alone on
2 CPU cores for 30 epochs (estimated from its first epochs' 13-15 images/s; the measured run
shared the cores with three others and took 1h28m). The same settings scale up unchanged on
an accelerator (raise data.image_size and model.features there).

    python run.py --config=configs/cpu.py --config.data.manual_dir=PATH --workdir=runs/cpu
    python run.py --config=configs/cpu.py --workdir=runs/cpu --mode=evaluate
    python run.py --config=configs/cpu.py --workdir=runs/cpu --mode=predict --input=P --output=O

Chosen by the ablation in RESULTS.md. Per-volume z-score normalisation (Buda et al.) was the
first choice and is one override away (`--config.data.normalize=zscore_volume`); it scores a
held-out patient whose pre-contrast channel has a constant background of 76 at Dice 0.0, which
x/255 does not (RESULTS.md says how that choice was made and what it means for the figures).
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
    config.data.normalize = "scale"
    config.augment.preset = "buda2019"
    config.model.features = 16
    config.model.depth = 4
    return config
