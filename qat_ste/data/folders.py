"""The image-folder layout: ``FOLDER/train/<class>/*`` with ``FOLDER/val/<class>/*`` (or test/), or
a flat ``FOLDER/<class>/*`` split per class; the class names and the files of a split."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import QatSteError
from .info import _check_split, _require_two_classes, stratified_split
from .readers import IMAGE_EXTENSIONS

__all__ = ["FolderSplit", "check_folder", "imagefolder_classes", "imagefolder_split"]

_SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "test"),
    "test": ("test", "val", "valid", "validation"),
}
_IMAGEFOLDER_FIX = (
    "point --data imagefolder:FOLDER at a folder with one subfolder of images per class "
    "(optionally inside train/ and val/ subfolders)"
)


def _class_folders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _image_names(folder: Path) -> list[str]:
    """The sorted names of the image files directly in ``folder`` (one scandir, no stat per file)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries
                      if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file())


def _imagefolder_classes(root: Path, split: str) -> tuple[list[str], Path, bool]:
    """(class names, the folder holding the split's class folders, whether the split is taken by
    ``val_fraction``) of an image folder; fewer than 2 classes are refused."""
    if (root / "train").is_dir():  # split layout
        chosen = next((root / name for name in _SPLIT_FOLDERS[split] if (root / name).is_dir()), None)
        if chosen is None:
            raise QatSteError(
                f"{root} has a train/ folder but no {'/'.join(_SPLIT_FOLDERS[split])} folder for split {split!r}",
                f"add {root / _SPLIT_FOLDERS[split][0]}/<class>/ folders, or use a flat FOLDER/<class>/ layout",
            )
        classes = _class_folders(root / "train")
        unknown = sorted(set(_class_folders(chosen)) - set(classes))
        if unknown:
            raise QatSteError(
                f"{chosen} has classes {', '.join(unknown)} that {root / 'train'} lacks",
                "use the same class subfolders in every split",
            )
        source, split_by_fraction = chosen, False
    else:
        classes = _class_folders(root)
        source, split_by_fraction = root, True
    if not classes:
        raise QatSteError(f"{source} has no class subfolders", _IMAGEFOLDER_FIX)
    _require_two_classes(len(classes), str(root / "train" if not split_by_fraction else root), "class folders",
                         "add a subfolder of images for each further class")
    return classes, source, split_by_fraction


def _imagefolder_files(source: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """The image files under ``source/<class>/`` (as ``<class>/<name>``) and their class indices."""
    files: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        class_dir = source / name
        if not class_dir.is_dir():
            continue  # a class missing from a held-out split simply has no images there
        found = _image_names(class_dir)
        if not found:
            raise QatSteError(
                f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})",
                "add images or remove the empty folder",
            )
        files.extend(f"{name}/{file}" for file in found)
        labels.extend([index] * len(found))
    return files, labels


@dataclass(frozen=True)
class FolderSplit:
    """The files of one split of an image folder: names relative to ``source`` (``class/file``)."""

    root: Path
    source: Path
    classes: tuple[str, ...]
    files: list[str]
    labels: list[int]


def imagefolder_classes(folder: str | Path) -> tuple[str, ...]:
    """The class names of an image folder (sorted subfolders, of train/ when present): cheap, no
    image is opened. Refuses a missing folder or fewer than 2 classes."""
    root = check_folder(folder)
    return tuple(_imagefolder_classes(root, "train")[0])


def check_folder(folder: str | Path) -> Path:
    """``folder`` as a Path, refused unless it is an existing folder."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise QatSteError(f"image folder {root} does not exist or is not a folder", _IMAGEFOLDER_FIX)
    return root


def imagefolder_split(folder: str | Path, split: str, val_fraction: float = 0.2, seed: int = 0) -> FolderSplit:
    """The files and labels of ``split`` of an image folder. Layouts: ``FOLDER/train/<class>/*``
    with ``FOLDER/val/<class>/*`` (or test/), or flat ``FOLDER/<class>/*``, split per class with
    ``val_fraction`` and ``seed``."""
    held_out = _check_split(split)
    root = check_folder(folder)
    classes, source, split_by_fraction = _imagefolder_classes(root, split)
    files, labels = _imagefolder_files(source, classes)
    if split_by_fraction:
        train_idx, val_idx = stratified_split(labels, val_fraction, seed)
        keep = val_idx if held_out else train_idx
        if len(keep) == 0:
            raise QatSteError(
                f"the {split} split of {root} is empty (val_fraction={val_fraction})",
                "raise val_fraction, add images, or use train/ and val/ subfolders",
            )
        files = [files[i] for i in keep]
        labels = [labels[i] for i in keep]
    if not files:
        raise QatSteError(f"no images found under {source}", _IMAGEFOLDER_FIX)
    return FolderSplit(root, source, tuple(classes), files, labels)
