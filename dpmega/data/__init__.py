"""Data sources that the samplers read at random: arrays, memory-mapped files, TFDS, Criteo, text."""
