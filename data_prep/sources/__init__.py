"""Where images come from: an ImageNet train folder, any class-per-folder tree, or the synthetic set."""

from data_prep.sources.base import BadInput, Item, ItemLoader, Problem, Source
from data_prep.sources.folder import FolderSource, ImageNetSource
from data_prep.sources.synthetic import SyntheticSource

__all__ = ["BadInput", "FolderSource", "ImageNetSource", "Item", "ItemLoader", "Problem", "Source",
           "SyntheticSource"]
