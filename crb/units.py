"""Constants that more than one part of crb uses: one definition each."""

GIB = 2**30  # bytes in a GiB
IGNORE = -100  # the label of a position that carries no loss (torch's cross_entropy ignore_index)
