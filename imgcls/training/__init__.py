"""Training behind train.py: the machine's loop, resuming, optimiser and losses, logs, k-fold."""
