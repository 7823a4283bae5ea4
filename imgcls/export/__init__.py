"""Export (export.py's work): the network in a deployable format, its parity with PyTorch, publishing."""
