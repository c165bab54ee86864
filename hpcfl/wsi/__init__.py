"""Whole-slide images: synthesis, reading (cuCIM, OpenSlide), tiling into a Feather index, tile datasets."""
