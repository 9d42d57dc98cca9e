"""dslc: compile declarative .model specs into standalone PyTorch packages."""

__version__ = "0.1.0"
