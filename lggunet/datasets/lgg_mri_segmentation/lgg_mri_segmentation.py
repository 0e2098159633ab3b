"""tfds builder for the LGG MRI Segmentation data set (Kaggle `kaggle_3m/`), split by patient."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from absl import logging

from lggunet import kaggle3m, normalization, splits

_DESCRIPTION = """\
Brain MR images of 110 lower-grade glioma patients from The Cancer Imaging Archive (TCGA-LGG),
with manual FLAIR abnormality masks (Buda et al. 2019). Each example is one axial slice:
a 256x256x3 uint8 image whose channels are pre-contrast, FLAIR and post-contrast, and a
256x256x1 uint8 mask in {0, 1}. Splits are made by patient unless the config says otherwise.
"""

_HOMEPAGE = "https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation"

# zlib level of the stored PNGs. Lossless at any level; 1 encodes an MRI slice ~4x faster
# than PIL's default 6 (7 against 27 ms; 44% of a preparation's time went there) for
# ~18% larger files, and decodes as fast.
PNG_COMPRESS_LEVEL = 1


def _png(array: np.ndarray, mode: str) -> bytes:
    """`array` as PNG bytes (tfds stores encoded bytes as given)."""
    out = io.BytesIO()
    PIL.Image.fromarray(array, mode=mode).save(out, format="png", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


@dataclasses.dataclass
class LggConfig(tfds.core.BuilderConfig):
    """How to split, and which source the prepared files come from.

    `fingerprint` (of the source's file list, sizes and stamps) is part of the config name, so
    a different or changed source prepares into a new folder instead of reusing a stale one.
    """

    split_mode: str = "patient"  # "patient" (honest) or "slice" (leaky, the notebook's)
    split_seed: int = 0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    fingerprint: str = ""
    source: str = ""  # the folder or zip to read; "" = the download manager's manual_dir
    skip_invalid: bool = False  # leave out bad slices (each reported) instead of stopping
    cv_folds: int = 0  # > 1: patient-level k-fold cross-validation; test = fold `cv_fold`
    cv_fold: int = 0


def make_config(
    fingerprint: str,
    source: str = "",
    split_mode: str = "patient",
    split_seed: int = 0,
    split_fractions=(0.8, 0.1, 0.1),
    skip_invalid: bool = False,
    cv_folds: int = 0,
    cv_fold: int = 0,
) -> LggConfig:
    fractions = tuple(float(f) for f in split_fractions)
    # Percent, exact (0.004 -> "0p4"): two splits never share a prepared folder.
    pct = "-".join(f"{f * 100:.10g}".replace(".", "p") for f in fractions)
    cv = f"-cv{cv_folds}fold{cv_fold}" if cv_folds else ""
    description = f"{split_mode}-level split {fractions}, seed {split_seed}"
    if cv_folds:
        description = (
            f"fold {cv_fold} of {cv_folds}-fold patient cross-validation (test: that fold; "
            f"validation: {fractions[1]:.0%} of the patients), seed {split_seed}"
        )
    return LggConfig(
        name=f"{split_mode}-seed{split_seed}-{pct}{cv}-{fingerprint[:16]}"
        + ("-skipinvalid" if skip_invalid else ""),
        description=description,
        split_mode=split_mode,
        split_seed=split_seed,
        split_fractions=fractions,
        fingerprint=fingerprint,
        source=str(source),
        skip_invalid=bool(skip_invalid),
        cv_folds=int(cv_folds),
        cv_fold=int(cv_fold),
    )


class LggMriSegmentation(tfds.core.GeneratorBasedBuilder):
    """LGG MRI Segmentation (kaggle_3m), one example per slice."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Per-slice tumour_area; per-volume channel mean and std (for z-scoring).",
        "1.2.0": "Per-volume brain_stats (brain_zscore normalisation; lggunet.normalization).",
    }
    BUILDER_CONFIGS = [make_config(fingerprint="any")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = kaggle3m.MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(256, 256, 3), dtype=np.uint8),
                    "mask": tfds.features.Image(shape=(256, 256, 1), dtype=np.uint8),
                    "patient_id": tfds.features.Text(),
                    "institution": tfds.features.Text(),
                    "slice_index": np.int32,
                    "tumour_area": np.int32,  # tumour pixels in the mask
                    # Per-channel mean and std over the patient's whole volume.
                    "volume_mean": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                    "volume_std": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                    # Background, brain threshold, clip range, mean and std over the brain.
                    "brain_stats": tfds.features.Tensor(shape=(6, 3), dtype=np.float32),
                }
            ),
            homepage=_HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
        )

    def _log_download_bytes(self) -> None:
        # tfds prints "Downloading and preparing dataset Unknown size ..." here; nothing is
        # downloaded (the slices are read where they are), so say what does happen.
        logging.info(
            "Preparing the data set from %s into %s (a one-time step; later runs reuse it)",
            self.builder_config.source or "the manual folder",
            self.data_dir,
        )

    def _log_download_done(self) -> None:
        logging.info("Prepared %s", self.data_dir)

    def _split_generators(self, dl_manager):
        config: LggConfig = self.builder_config
        source = kaggle3m.open_source(config.source or dl_manager.manual_dir)
        fingerprint = source.fingerprint()
        if fingerprint != config.fingerprint:
            raise kaggle3m.DataError(
                f"{source.location}: its fingerprint {fingerprint[:16]} does not match the "
                f"config's {config.fingerprint[:16]}; make the config with make_config()"
            )
        self.info.metadata["skipped"] = []
        problems = [] if config.skip_invalid else None
        slices = kaggle3m.list_slices(source, problems)
        for message in problems or []:
            self._skip(message)
        if config.cv_folds:
            by_patient = splits.split_cross_validation(
                [s.patient_id for s in slices],
                config.cv_folds,
                config.cv_fold,
                config.split_fractions[1],
                config.split_seed,
            )
            names = [by_patient[s.patient_id] for s in slices]
        elif config.split_mode == "patient":
            by_patient = splits.split_by_patient(
                [s.patient_id for s in slices], config.split_fractions, config.split_seed
            )
            names = [by_patient[s.patient_id] for s in slices]
        elif config.split_mode == "slice":
            names = splits.split_by_slice(len(slices), config.split_fractions, config.split_seed)
        else:
            raise ValueError(f"split_mode must be 'patient' or 'slice', not {config.split_mode!r}")
        per_split = {
            name: [s for s, n in zip(slices, names, strict=True) if n == name]
            for name in splits.SPLITS
        }
        self.info.metadata.update(
            source=source.location,
            fingerprint=fingerprint,
            split_mode=config.split_mode,
            split_seed=config.split_seed,
            split_fractions=list(config.split_fractions),
            cv_folds=config.cv_folds,
            cv_fold=config.cv_fold,
            patients={n: sorted({s.patient_id for s in v}) for n, v in per_split.items()},
        )
        if config.split_mode == "slice":  # a patient's slices are spread over the splits
            self.info.metadata["slices"] = {
                n: sorted(f"{s.patient_id}#{s.index}" for s in v) for n, v in per_split.items()
            }
        return {
            name: self._generate_examples(source, part) for name, part in per_split.items() if part
        }

    def _skip(self, message: str) -> None:
        """data.skip_invalid: leave the slice out, and say so (also in the metadata)."""
        logging.warning("Skipping: %s", message)
        self.info.metadata["skipped"].append(message)

    def _generate_examples(self, source: kaggle3m.Source, slices: list[kaggle3m.Slice]):
        """Reads one patient at a time, so each slice can carry its volume's statistics."""
        by_case: dict[str, list[kaggle3m.Slice]] = {}
        for s in slices:
            by_case.setdefault(s.case, []).append(s)
        skip = self.builder_config.skip_invalid
        for case_slices in by_case.values():
            images, masks, good = [], [], []
            for s in case_slices:
                try:
                    image, mask = (
                        kaggle3m.read_image(source, s.image),
                        kaggle3m.read_mask(source, s.mask),
                    )
                except kaggle3m.DataError as e:
                    if not skip:
                        raise
                    self._skip(str(e))
                    continue
                images.append(image)
                masks.append(mask)
                good.append(s)
            if not good:
                continue
            case_slices = good
            mean, std = kaggle3m.volume_statistics(images)
            brain_stats = normalization.brain_statistics(images)
            for s, image, mask in zip(case_slices, images, masks, strict=True):
                example = {
                    "image": _png(image, "RGB"),
                    "mask": _png(mask, "L"),
                    "patient_id": s.patient_id,
                    "institution": s.institution,
                    "slice_index": s.index,
                    "tumour_area": int(mask.sum()),
                    "volume_mean": mean,
                    "volume_std": std,
                    "brain_stats": brain_stats,
                }
                yield f"{s.case}_{s.index}", example
