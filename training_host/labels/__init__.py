"""Weak labels (boxes, rotated boxes, image tags, block maps): the label file format and block targets from it."""
