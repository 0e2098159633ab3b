"""The Keras notebook's settings: U-Net base 64 / depth 4 on 256x256x3, batch 32, 100 epochs,
Adam 1e-4, Dice loss, ReduceLROnPlateau(val_loss, factor 0.5, patience 5).

Unlike the notebook, splits are by patient (80/10/10); set data.split_mode='slice' to
reproduce its leaky slice-level split.

    python run.py --config=configs/unet.py --config.data.manual_dir=PATH --workdir=runs/unet
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.config_version = 15  # lggunet.configuration.VERSION: saved configs are upgraded by it
    config.seed = 0
    config.batch_size = 32  # global batch, split across devices
    config.eval_batch_size = 32
    config.num_epochs = 100
    config.learning_rate = 1e-4
    # "plateau": the rate stays at learning_rate until the plateau schedule below halves it
    # (Keras). "cosine": linear warm-up from 0 over `warmup_epochs`, then cosine decay to 0 at
    # the last step (per step, inside the train step); the plateau fields are then unused.
    config.lr_schedule = "plateau"
    config.warmup_epochs = 0.0
    # "dice" (the notebook's -Dice, smooth=100), "bce_dice", or "topk_bce_dice" (BCE over the
    # hardest 10% of the pixels, nnU-Net's TopK10, plus Dice).
    config.loss = "dice"
    # The loss's overlap term as a Tversky index: (2TP+s) / (2TP + 2(1-b)FP + 2b FN + s).
    # 0.5 is the notebook's Dice; above it a missed tumour pixel costs more than a false alarm.
    config.tversky_beta = 0.5
    # Train on the masks as resized to data.image_size and warped by augmentation (bilinear,
    # values in [0, 1] at the edges) instead of thresholding them at 0.5 (Keras-style binary
    # masks). At 128x128 binary targets cap a perfect model at per-volume Dice 0.970, soft ones
    # at 0.993 (bench/resolution_ceiling.py). Same cost.
    config.soft_targets = False
    config.dtype = "float32"  # or "bfloat16": compute dtype; parameters, optimizer, loss stay f32
    config.log_every_steps = 50
    config.summary_images = 8  # validation slices drawn into TensorBoard (0: none)
    config.summary_every_epochs = 1  # draw them every this many epochs
    # On a CPU, split it into this many JAX devices, each running its share of every batch side
    # by side (same training up to summation order; 1.5-1.9x on 2 cores). 0: one per logical
    # CPU (at most 4), as many as divide batch_size and eval_batch_size. Set before JAX starts
    # (lggunet.parallel.use_host_devices); XLA_FLAGS's or $JAX_NUM_CPU_DEVICES's count wins.
    config.host_devices = 1
    # A folder for jax's persistent compilation cache ("" = off): reruns skip compiling.
    config.compilation_cache_dir = ""
    # A jax.profiler trace of `profile.steps` training steps from step `profile.first_step`
    # on (0: none), written to WORKDIR/tensorboard/plugins/profile/ (TensorBoard's profile
    # tab, Perfetto); every step is marked "train" with its number. bench/profile_loop.py
    # reads it: what each step launches and where the device waits.
    config.profile = ml_collections.ConfigDict()
    config.profile.first_step = 0
    config.profile.steps = 5

    # Stop when val_loss has not improved by more than min_delta for `patience` epochs.
    # Default 0 = off: the notebook trains all 100 epochs (its best checkpoint is kept anyway).
    config.early_stopping = ml_collections.ConfigDict()
    config.early_stopping.patience = 0
    config.early_stopping.min_delta = 1e-4

    config.distributed = _distributed()
    config.plateau = _plateau()
    config.data = _data()
    config.augment = _augment()
    config.evaluate, config.predict = _evaluate_and_predict()
    config.model = _model()
    return config


def _distributed() -> ml_collections.ConfigDict:
    # Multi-process runs (one process per host): jax.distributed.initialize() is called when
    # coordinator_address is set here or in $JAX_COORDINATOR_ADDRESS (with $JAX_NUM_PROCESSES,
    # $JAX_PROCESS_ID), or when auto=True (SLURM, Open MPI, TPU pods are detected).
    distributed = ml_collections.ConfigDict()
    distributed.auto = False
    distributed.coordinator_address = ""  # host:port of process 0
    distributed.num_processes = 0
    distributed.process_id = -1

    return distributed


def _plateau() -> ml_collections.ConfigDict:
    # Keras ReduceLROnPlateau(monitor='val_loss') semantics, stepped once per epoch.
    plateau = ml_collections.ConfigDict()
    plateau.factor = 0.5
    plateau.patience = 5
    plateau.min_delta = 1e-4  # Keras default: improvement means val_loss < best - 1e-4
    plateau.cooldown = 0

    return plateau


def _data() -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict()
    data.manual_dir = ""  # kaggle_3m folder, a folder holding it, or the Kaggle zip
    data.data_dir = ""  # prepared data sets; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    data.download = False  # fetch with kagglehub when nothing is found locally
    data.phantom = False  # with no manual_dir: train on the synthetic phantom instead
    data.phantom_patients = 12
    data.phantom_slices = 20
    data.phantom_seed = 0
    data.image_size = 256  # the model's input size; slices are resized on device
    data.split_mode = "patient"  # "patient", or "slice" (leaky: the notebook's split)
    data.split_seed = 0
    # Train, validation, test (of patients). Validation 0: none, when nothing chooses by its
    # loss (lr_schedule "cosine", evaluate.checkpoint "last", early_stopping.patience 0).
    data.split_fractions = (0.8, 0.1, 0.1)
    # Patient-level k-fold cross-validation (folds stratified by institution, split_seed):
    # cv_folds > 1 trains one model per fold in WORKDIR/fold_<k> (test = fold k; validation =
    # split_fractions[1] of the patients, from the other folds), then writes cv_report.*.
    # cv_fold = -1 runs every fold in turn (resumable); k >= 0 only fold k.
    data.cv_folds = 0
    data.cv_fold = -1
    data.num_threads = 4  # grain reader threads
    data.num_workers = 0  # grain worker processes (0: read in this process)
    data.device_cache = False  # hold train + validation on the device (uint8, ~1 GB)
    # "scale" (x/255, the notebook), "zscore_volume" or "brain_zscore" (lggunet/normalization.py)
    data.normalize = "scale"
    data.skip_invalid = False  # True: leave out bad slices (each reported) instead of stopping
    data.oversample_tumour = 1.0  # tumour slices appear this many times per epoch
    # 2.5D input: the images of this many neighbouring slices on each side of a slice (same
    # patient, nearest slice repeated past the volume's ends) as further input channels,
    # normalised and augmented with the slice (lggunet.context). 0: one slice, 3 channels.
    data.context_slices = 0

    return data


def _augment() -> ml_collections.ConfigDict:
    # Keras ImageDataGenerator semantics and the notebook's values; see lggunet/augment.py.
    augment = ml_collections.ConfigDict()
    augment.enabled = True
    # "" = the fields below; or "buda2019", "buda2019_intensity", "notebook", "none"
    augment.preset = ""
    augment.rotation_range = 0.2  # degrees (the notebook's 0.2 is 0.2 degrees in Keras)
    augment.width_shift_range = 0.05  # fraction of the width
    augment.height_shift_range = 0.05  # fraction of the height
    augment.shear_range = 0.05  # degrees
    augment.zoom_range = 0.05  # factors in [1 - z, 1 + z], x and y drawn independently
    augment.horizontal_flip = True
    augment.intensity = False  # nnU-Net-style intensity transforms (lggunet/intensity.py)
    # With intensity transforms on (this flag or an "_intensity" preset): the probability of
    # each channel-copy transform (a channel replaced by another; every channel by one), which
    # mimics scans whose missing sequences were filled with copies. nnU-Net's 0.1.
    augment.channel_copy_p = 0.1
    # With intensity transforms on: a factor on the probabilities of the others (noise, blur,
    # brightness, whole-scan scaling, contrast, gamma), each capped at 1. 1 keeps nnU-Net's
    # probabilities; 2 doubles them (a heavier augmentation, for data from many scanners).
    augment.intensity_p_scale = 1.0
    # With intensity transforms on: the probability that a slice's tumour is made fainter
    # (per channel, moved towards the tissue around it; lggunet/intensity.py). Off by default.
    augment.tumour_contrast_p = 0.0

    return augment


def _evaluate_and_predict() -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    # --mode=evaluate: which variants report.json / report.md show besides the plain model.
    evaluate = ml_collections.ConfigDict()
    evaluate.tta = True  # also average with the horizontally flipped prediction
    evaluate.largest_component = True  # also keep the largest 3D component per patient
    evaluate.detection_min_pixels = 10  # a slice is "called" with >= this many pixels
    # Which kept checkpoint the final evaluation, --mode=evaluate, --mode=predict and
    # load_model(workdir) use: "best" (lowest val_loss, as Keras ModelCheckpoint) or "last".
    evaluate.checkpoint = "best"

    # --mode=predict: how the written masks are made (default: the plain network, p > 0.5).
    predict = ml_collections.ConfigDict()
    predict.tta = False
    predict.largest_component = False
    predict.threshold = 0.5
    predict.min_component_voxels = 0  # drop 3D components under this size per patient (0: off)
    # Voxel size in mm (the Kaggle TIFFs record none; 0 = unknown): with both, volumes.csv
    # gives tumour mm^3 and ml and HD95 in mm, and the NIfTI masks carry the spacing.
    predict.pixel_spacing_mm = 0.0
    predict.slice_thickness_mm = 0.0

    return evaluate, predict


def _model() -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict()
    model.features = 64  # base width; level i has features * 2**i channels
    model.depth = 4  # number of down-sampling steps
    model.batch_norm = True  # False: no normalisation layers at all
    # "batch" (BatchNorm, the notebook's) or "instance" (per example, as nnU-Net; no running
    # statistics, so training and inference normalise alike).
    model.norm = "batch"
    # Deep supervision (nnU-Net): k > 0 adds output heads at decoder levels 1..k (1/2, 1/4,
    # ... of the input size), trained against downsampled masks with weights 1/2, 1/4, ...
    # beside the full-size output's 1, normalised. Training only; inference runs no heads.
    model.deep_supervision = 0
    model.dropout = 0.0  # dropout rate on the bottleneck
    # True: each image beside its left-right mirror as further input channels (a tumour is an
    # asymmetry between the hemispheres; lggunet.models.with_mirror). On configs/cpu.py it
    # cross-validated worse (-0.050 with TTA on folds 0-2, RESULTS.md, session 29).
    model.mirror_input = False
    model.bn_momentum = 0.99  # BatchNorm running statistics (Keras default)
    model.output_bias = 0.0  # initial output logit bias (Keras: 0; a prior: -4, p ~ 0.018)
    # Layer forms a GPU runs faster, same parameters and result (lggunet.models.UNet):
    # "auto" (on unless JAX's default backend is the CPU), "on" or "off".
    model.gpu_layers = "auto"
    return model
