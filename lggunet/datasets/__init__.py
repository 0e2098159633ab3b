"""tfds data sets of lggunet."""
