"""crb: the Cognitive Retail Brain trainer. Recipe -> plan -> build -> loop -> artifacts."""

__version__ = "0.1.0"
