"""The Keras notebook's settings: U-Net base 64 / depth 4 on 256x256x3, batch 32, 100 epochs,
Adam 1e-4, Dice loss, ReduceLROnPlateau(val_loss, factor 0.5, patience 5).

Unlike the notebook, splits are by patient (80/10/10); set data.split_mode='slice' to
reproduce its leaky slice-level split.

    python run.py --config=configs/unet.py --config.data.manual_dir=PATH --workdir=runs/unet
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 32  # global batch, split across devices
    config.eval_batch_size = 32
    config.num_epochs = 100
    config.learning_rate = 1e-4
    config.loss = "dice"  # "dice" (the notebook's -Dice, smooth=100) or "bce_dice"
    config.dtype = "float32"  # or "bfloat16": compute dtype; parameters, optimizer, loss stay f32
    config.log_every_steps = 50
    config.summary_images = 8  # validation slices drawn into TensorBoard at each evaluation

    # Stop when val_loss has not improved by more than min_delta for `patience` epochs.
    # Default 0 = off: the notebook trains all 100 epochs (its best checkpoint is kept anyway).
    config.early_stopping = ml_collections.ConfigDict()
    config.early_stopping.patience = 0
    config.early_stopping.min_delta = 1e-4

    # Multi-process runs (one process per host): jax.distributed.initialize() is called when
    # coordinator_address is set here or in $JAX_COORDINATOR_ADDRESS (with $JAX_NUM_PROCESSES,
    # $JAX_PROCESS_ID), or when auto=True (SLURM, Open MPI, TPU pods are detected).
    config.distributed = ml_collections.ConfigDict()
    config.distributed.auto = False
    config.distributed.coordinator_address = ""  # host:port of process 0
    config.distributed.num_processes = 0
    config.distributed.process_id = -1

    # Keras ReduceLROnPlateau(monitor='val_loss') semantics, stepped once per epoch.
    config.plateau = ml_collections.ConfigDict()
    config.plateau.factor = 0.5
    config.plateau.patience = 5
    config.plateau.min_delta = 1e-4  # Keras default: improvement means val_loss < best - 1e-4
    config.plateau.cooldown = 0

    config.data = ml_collections.ConfigDict()
    config.data.manual_dir = ""  # kaggle_3m folder, a folder holding it, or the Kaggle zip
    config.data.data_dir = ""  # prepared data sets; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.data.download = False  # fetch with kagglehub when nothing is found locally
    config.data.phantom = False  # with no manual_dir: train on the synthetic phantom instead
    config.data.phantom_patients = 12
    config.data.phantom_slices = 20
    config.data.phantom_seed = 0
    config.data.image_size = 256  # the model's input size; slices are resized on device
    config.data.split_mode = "patient"  # "patient", or "slice" (leaky: the notebook's split)
    config.data.split_seed = 0
    config.data.split_fractions = (0.8, 0.1, 0.1)  # train, validation, test (of patients)
    # Patient-level k-fold cross-validation (folds stratified by institution, split_seed):
    # cv_folds > 1 trains one model per fold in WORKDIR/fold_<k> (test = fold k; validation =
    # split_fractions[1] of the patients, from the other folds), then writes cv_report.*.
    # cv_fold = -1 runs every fold in turn (resumable); k >= 0 only fold k.
    config.data.cv_folds = 0
    config.data.cv_fold = -1
    config.data.num_threads = 4  # grain reader threads
    config.data.num_workers = 0  # grain worker processes (0: read in this process)
    config.data.device_cache = False  # hold train + validation on the device (uint8, ~1 GB)
    # "scale" (x/255, the notebook), "zscore_volume" or "brain_zscore" (lggunet/normalization.py)
    config.data.normalize = "scale"
    config.data.skip_invalid = (
        False  # True: leave out bad slices (each reported) instead of stopping
    )
    config.data.oversample_tumour = 1.0  # tumour slices appear this many times per epoch

    # Keras ImageDataGenerator semantics and the notebook's values; see lggunet/augment.py.
    config.augment = ml_collections.ConfigDict()
    config.augment.enabled = True
    # "" = the fields below; or "buda2019", "buda2019_intensity", "notebook", "none"
    config.augment.preset = ""
    config.augment.rotation_range = 0.2  # degrees (the notebook's 0.2 is 0.2 degrees in Keras)
    config.augment.width_shift_range = 0.05  # fraction of the width
    config.augment.height_shift_range = 0.05  # fraction of the height
    config.augment.shear_range = 0.05  # degrees
    config.augment.zoom_range = 0.05  # factors in [1 - z, 1 + z], x and y drawn independently
    config.augment.horizontal_flip = True
    config.augment.intensity = False  # nnU-Net-style intensity transforms (lggunet/intensity.py)

    # --mode=evaluate: which variants report.json / report.md show besides the plain model.
    config.evaluate = ml_collections.ConfigDict()
    config.evaluate.tta = True  # also average with the horizontally flipped prediction
    config.evaluate.largest_component = True  # also keep the largest 3D component per patient
    config.evaluate.detection_min_pixels = 10  # a slice is "called" with >= this many pixels

    # --mode=predict: how the written masks are made (default: the plain network, p > 0.5).
    config.predict = ml_collections.ConfigDict()
    config.predict.tta = False
    config.predict.largest_component = False
    config.predict.threshold = 0.5

    config.model = ml_collections.ConfigDict()
    config.model.features = 64  # base width; level i has features * 2**i channels
    config.model.depth = 4  # number of down-sampling steps
    config.model.batch_norm = True
    config.model.dropout = 0.0  # dropout rate on the bottleneck
    config.model.bn_momentum = 0.99  # BatchNorm running statistics (Keras default)
    return config
