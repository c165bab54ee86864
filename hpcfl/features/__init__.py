"""Tile features per slide: ``hpcfl features`` writes them (:mod:`.extract`), ``task: mil`` reads them (:mod:`.store`).

Importing this package never imports torch."""
from .store import Bag, FeatureError, feature_path, load_bag, load_bags, read_meta, weights_digest

__all__ = ["Bag", "FeatureError", "feature_path", "load_bag", "load_bags", "read_meta", "weights_digest"]
