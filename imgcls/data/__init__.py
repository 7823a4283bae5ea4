"""Images and their splits: folders and label files, safe decoding, the file check, splits, caches, datasets."""
