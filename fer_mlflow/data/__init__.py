"""Datasets and the files they come from: sources, the one reader of folders and zips, decoding
images within limits, cleaning rules, demo data. Imports nothing of the layers above."""
