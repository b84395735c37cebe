"""Build an on-disk class-per-folder image tree with every kind of bad input the writer must survive."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class ImageTree:
    root: Path
    classes: list[str]
    good: list[tuple[str, int]] = field(default_factory=list)
    """(relative path, label) of every decodable image, in the order the writer must store them."""
    bad: dict[str, str] = field(default_factory=dict)
    """relative path -> a word the skip reason must contain."""
    source_problems: list[str] = field(default_factory=list)
    """keys of defects found while listing (empty class folder, stray file)."""


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def make_image_tree(root: Path, *, with_bad_inputs: bool = True, with_source_problems: bool = True) -> ImageTree:
    """cat/, dog/ (nested sub-folder), fish/ and, optionally, an empty class and every kind of bad input."""
    classes = ["cat", "dog", "empty_class", "fish"] if with_source_problems else ["cat", "dog", "fish"]
    tree = ImageTree(root=root, classes=classes)
    for name in classes:
        (root / name).mkdir(parents=True)
    label = {name: i for i, name in enumerate(classes)}

    def add(relative: str, image: Image.Image, **save: object) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **save)
        tree.good.append((relative, label[relative.split("/")[0]]))

    add("cat/a.jpg", _noise(80, 60, 1), quality=90)
    add("cat/b.png", _noise(40, 50, 2))
    add("cat/c.jpg", _noise(64, 64, 3).convert("L"), quality=90)  # greyscale source
    add("dog/a.jpg", _noise(120, 48, 4), quality=90)
    add("dog/sub/deep.png", _noise(33, 77, 5).convert("RGBA"))
    add("fish/a.JPEG", _noise(200, 150, 6), quality=90)
    (root / "cat" / ".DS_Store").write_bytes(b"hidden files are ignored")

    if with_bad_inputs:
        whole = root / "whole.jpg"
        _noise(90, 90, 7).save(whole, quality=90)
        data = whole.read_bytes()
        whole.unlink()
        (root / "dog" / "truncated.jpg").write_bytes(data[: len(data) // 2])
        tree.bad["dog/truncated.jpg"] = "truncated"
        (root / "dog" / "notes.txt").write_text("not an image")
        tree.bad["dog/notes.txt"] = "cannot identify"
        os.symlink(root / "nowhere.jpg", root / "fish" / "broken_link.jpg")
        tree.bad["fish/broken_link.jpg"] = "No such file"
        if os.geteuid() != 0:  # root reads anything; the dangling link stands for unreadable files there
            locked = root / "fish" / "locked.png"
            _noise(20, 20, 8).save(locked)
            locked.chmod(0)
            tree.bad["fish/locked.png"] = "Permission denied"
    if with_source_problems:
        (root / "stray.txt").write_text("a file outside any class folder")
        tree.source_problems = ["empty_class/", "stray.txt"]

    tree.good.sort(key=lambda item: (item[1], item[0]))
    return tree
