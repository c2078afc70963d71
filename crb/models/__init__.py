"""Models crb must write by hand: only the CLaRa compressor/generator wrapper."""
