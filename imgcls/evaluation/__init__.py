"""A model over images: inference, metrics, calibration, explanations, eval.py's and test.py's reports."""
