"""Image trees on disk: any class-per-folder tree, and the ImageNet train folder (synset-named classes).

Classes are the immediate sub-folders of the root, sorted by name; a class's images are all files under
its folder (recursively, sorted by path), so the item order is a pure function of the tree. Hidden
names (starting with '.') are ignored. Any other file is tried as an image; one that does not decode is
skipped and reported, never dropped silently. Empty class folders keep their label and are reported.

    source = ImageNetSource("/data/imagenet/train")            # labels = index of sorted synsets
    source = FolderSource("/data/flowers")                      # labels = index of sorted folder names
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep.errors import PrepError
from data_prep.sources.base import BadInput, Item, ItemLoader, Problem, Source
from dip_scale.data.adm_crop import adm_center_crop

SYNSET_PATTERN = re.compile(r"^n\d{8}$")
SYNSET_MAPPING_NAMES = ("LOC_synset_mapping.txt", "synset_words.txt")
"""Files mapping synset ids to class names ('n01440764 tench, Tinca tinca'), as shipped with ImageNet."""


class FileLoader(ItemLoader):
    """Decodes a file under `root` and applies the ADM centre crop."""

    def __init__(self, root: str) -> None:
        self.root = root

    def load(self, item: Item, resolution: int) -> np.ndarray:
        path = os.path.join(self.root, *item.key.split("/"))
        try:
            # Some ImageNet JPEGs carry malformed EXIF blocks; PIL warns but the pixels are intact.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as image:
                    image.load()  # decode now: truncation surfaces here, not lazily later
                    return adm_center_crop(image, resolution)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise BadInput(f"{type(error).__name__}: {error}") from error


def _list_class(class_dir: str) -> list[str]:
    """Relative paths ('/'-separated, from class_dir) of all non-hidden files under class_dir, sorted."""
    found = []
    for directory, subdirs, files in os.walk(class_dir, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        relative = os.path.relpath(directory, class_dir)
        for name in files:
            if not name.startswith("."):
                found.append(name if relative == "." else f"{relative}/{name}".replace(os.sep, "/"))
    return sorted(found)


class FolderSource(Source):
    """Any tree `root/<class>/**/<image>`; class names are the folder names."""

    kind = "folder"

    def __init__(self, root: str, *, progress: bool = False) -> None:
        self._root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(self._root):
            raise PrepError(f"source folder {root!r} does not exist or is not a directory")
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        class_folders = []
        with os.scandir(self._root) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    class_folders.append(entry.name)
                else:
                    self.problems.append(Problem(entry.name, "file outside any class folder: not used"))
        if not class_folders:
            raise PrepError(f"source folder {self._root!r} has no class sub-folders: expected root/<class>/<image>")
        self.num_class_folders = len(class_folders)
        self.class_names, label_of = self._classes(sorted(class_folders))

        # One flat, sorted list of (relative path, label), built once; workers get only their chunk.
        self._keys: list[str] = []
        self._labels_of_items: list[int] = []
        digest = hashlib.sha256()
        for folder in tqdm(sorted(class_folders), desc="listing", unit="class", disable=not progress):
            files = _list_class(os.path.join(self._root, folder))
            if not files:
                self.problems.append(Problem(folder + "/", "empty class folder", label_of[folder]))
            for name in files:
                key = f"{folder}/{name}"
                self._keys.append(key)
                self._labels_of_items.append(label_of[folder])
                digest.update(f"{label_of[folder]}\t{key}\n".encode())
        self._listing_sha256 = digest.hexdigest()

    def _classes(self, folders: list[str]) -> tuple[list[str], dict[str, int]]:
        """Class names, and the label of each class folder (sorted folder names here)."""
        return list(folders), {name: label for label, name in enumerate(folders)}

    @property
    def root(self) -> str:
        return self._root

    @property
    def num_items(self) -> int:
        return len(self._keys)

    def items(self, start: int, stop: int) -> list[Item]:
        return [Item(key, label) for key, label in zip(self._keys[start:stop], self._labels_of_items[start:stop])]

    def loader(self) -> FileLoader:
        return FileLoader(self._root)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_items": self.num_items, "num_classes": len(self.class_names),
                "listing_sha256": self._listing_sha256}


def _find_synset_mapping(root: str) -> str | None:
    """LOC_synset_mapping.txt or synset_words.txt in root or up to four folders above it.

    Four: the Kaggle download keeps the mapping next to ILSVRC/, the train folder in ILSVRC/Data/CLS-LOC/train.
    """
    directory = root
    for _ in range(5):
        for name in SYNSET_MAPPING_NAMES:
            if os.path.isfile(os.path.join(directory, name)):
                return os.path.join(directory, name)
        directory = os.path.dirname(directory)
    return None


def read_synset_mapping(path: str) -> dict[str, str]:
    """Synset id -> class name from lines like 'n01440764 tench, Tinca tinca', in file order."""
    mapping: dict[str, str] = {}
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            line = line.strip()
            if not line:
                continue
            synset, _, name = line.partition(" ")
            if not SYNSET_PATTERN.match(synset):
                raise PrepError(f"{path}:{number}: expected 'n########  class name', got {line[:60]!r}")
            mapping[synset] = name.strip() or synset
    return mapping


class ImageNetSource(FolderSource):
    """The ImageNet train folder as distributed: `root/n01440764/n01440764_10026.JPEG`, ...

    With a synset mapping file (given, or found next to the tree) labels index the mapping's synsets in
    sorted order, the standard ImageNet-1k class indices even for a subset of folders; without one they
    index the sorted folder names, and class names are the synset ids.
    """

    kind = "imagenet"

    def __init__(self, root: str, *, synset_mapping: str | None = None, progress: bool = False) -> None:
        self._mapping_path = synset_mapping or _find_synset_mapping(os.path.abspath(os.path.expanduser(root)))
        self._mapping = read_synset_mapping(self._mapping_path) if self._mapping_path else None
        super().__init__(root, progress=progress)
        if self._mapping is None:
            self.notes.append("no synset mapping file found (LOC_synset_mapping.txt): class names are the synset ids")
        else:
            self.notes.append(f"class names from {self._mapping_path}")
        if self.num_class_folders != 1000:
            self.notes.append(f"{self.num_class_folders} synset folders (ImageNet-1k has 1000)")

    def _classes(self, folders: list[str]) -> tuple[list[str], dict[str, int]]:
        bad = [name for name in folders if not SYNSET_PATTERN.match(name)]
        if bad:
            raise PrepError(f"not an ImageNet train folder: sub-folders {bad[:5]} are not synset ids like "
                            "'n01440764'; use `dip-prep write folder` for other class-per-folder trees")
        if self._mapping is not None:
            unknown = [name for name in folders if name not in self._mapping]
            if unknown:
                raise PrepError(f"synsets {unknown[:5]} are not in the mapping file {self._mapping_path}")
        self.synsets = sorted(self._mapping) if self._mapping is not None else list(folders)
        label_of_synset = {synset: label for label, synset in enumerate(self.synsets)}
        names = [self._mapping[s] for s in self.synsets] if self._mapping is not None else list(folders)
        return names, {folder: label_of_synset[folder] for folder in folders}

    def describe(self) -> dict[str, Any]:
        synsets = "\n".join(self.synsets or [])
        return {**super().describe(), "synsets_sha256": hashlib.sha256(synsets.encode()).hexdigest()}
