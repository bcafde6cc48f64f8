"""tvmlayers: torch's Conv2d, MaxPool2d, Linear and ReLU compiled by Apache TVM."""

__version__ = "0.1.0"
