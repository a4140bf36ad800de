"""The ten Medical Segmentation Decathlon tasks (3D NIfTI volumes): BraTS (Task01) in distribution, the other nine
out (upstream's ``src/data/get_decathlon_datasets.py``).

Files as MONAI's ``DecathlonDataset`` downloads them into its ``root_dir`` (default ``D/Decathlon``):
``<root>/<TaskXX_Name>/{dataset.json,imagesTr/,labelsTr/,imagesTs/}``, or the archive ``<root>/<TaskXX_Name>.tar``.
The volumes are used as they are: the split CSVs ``D/data_splits/<TaskXX_Name>_{train,val,test}.csv`` list the
``.nii.gz`` files.

Split: MONAI's own, computed by MONAI (``DecathlonDataset(download=False)`` on the folder, seed 0, val_frac 0.2, as
upstream): train/val = dataset.json's "training" list shuffled by ``RandomState(0)``, the first 20% val; test =
dataset.json's "test" list (no labels; none are needed here). dataset.json's order is part of the dataset, so the split
is the same on every machine, and it lists the same files as upstream's CSVs.

Multi-channel tasks (BraTS: FLAIR, T1w, t1gd, T2w; Prostate: T2, ADC) are listed as they are; with
``--is_grayscale=1`` training and reconstruction keep one channel, ``--channel`` (default 0, as upstream).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ddpm_ood.data.sources import DECATHLON_TASKS, DatasetFamily, DatasetUnavailable, SplitFiles
from ddpm_ood.data.sources.archives import obtain_folder
from ddpm_ood.errors import one_line

FOLDER = "Decathlon"  # upstream's README passes --data_root=${data_root}/Decathlon
SEED = 0  # DecathlonDataset's default, as upstream
VAL_FRACTION = 0.2  # DecathlonDataset's default
SECTIONS = (("train", "training"), ("val", "validation"), ("test", "test"))
LAYOUT = "MONAI's Decathlon layout (dataset.json, imagesTr/, imagesTs/)"


def _download_source(task: str) -> tuple[str, str]:
    from monai.apps import DecathlonDataset

    return DecathlonDataset.resource[task], DecathlonDataset.md5[task]


def _monai_sections(task: str, root: str) -> SplitFiles:
    """The image paths of MONAI's training/validation/test sections of an extracted task folder."""
    from monai.apps import DecathlonDataset

    out: SplitFiles = {}
    for split, section in SECTIONS:
        # cache_rate=0: MONAI lists the files and loads none of them.
        ds = DecathlonDataset(root_dir=root, task=task, section=section, download=False, seed=SEED,
                              val_frac=VAL_FRACTION, cache_rate=0.0, progress=False)
        images = [item["image"] for item in ds.data]
        if not all(isinstance(p, str) for p in images):
            raise ValueError(f"{section} entries must name one image file each")
        out[split] = images
    return out


def channel_names(task_dir: str | os.PathLike) -> list[str]:
    """The channel names of a task's volumes from dataset.json's "modality" ({"0": "FLAIR", ...}), in channel order."""
    modality = json.loads((Path(task_dir) / "dataset.json").read_text()).get("modality") or {}
    return [str(modality[k]) for k in sorted(modality, key=int)]


def list_task(task: str, root: str, allow_download: bool, timeout_s: float) -> SplitFiles:
    """The train/val/test volume lists of Decathlon ``task`` under ``root`` (MONAI's root_dir); see the module
    docstring. Raises DatasetUnavailable naming where the files were expected, or the first listed file missing."""
    task_dir = obtain_folder(Path(root) / task, Path(root) / f"{task}.tar",
                             ready=lambda d: (d / "dataset.json").is_file(),
                             download_source=lambda: _download_source(task), allow_download=allow_download,
                             timeout_s=timeout_s, what=task, expected=LAYOUT)
    json_path = task_dir / "dataset.json"
    try:
        splits = _monai_sections(task, root)
        channels = channel_names(task_dir)
    except Exception as exc:  # MONAI: ValueError/KeyError/TypeError/IndexError for a malformed dataset.json
        raise DatasetUnavailable(f"{task}: {json_path} is not a Decathlon dataset.json MONAI reads "
                                 f"({one_line(exc)})") from None
    listed = [p for paths in splits.values() for p in paths]
    missing = [p for p in listed if not os.path.isfile(p)]
    if missing:
        raise DatasetUnavailable(f"{task}: {len(missing)} of the {len(listed)} volumes listed in {json_path} are "
                                 f"missing, first {missing[0]} (an incomplete copy? expected {LAYOUT})")
    if len(channels) > 1:
        named = ", ".join(f"{i} {c}" for i, c in enumerate(channels))
        print(f"{task}: {len(channels)}-channel volumes ({named}); with --is_grayscale=1 training and "
              "reconstruction keep one channel: --channel=k, default 0 (as the reference)", flush=True)
    return splits


FAMILIES: dict[str, DatasetFamily] = {
    name: DatasetFamily(list_files=list_task, folder=FOLDER) for name in DECATHLON_TASKS
}
