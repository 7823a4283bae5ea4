"""Label cleaning: wrong labels, outliers and look-alikes across classes, found from a k-fold job's
out-of-fold probabilities with cleanlab (clean.py find), and the decisions a person took applied as a
corrected label file (clean.py apply)."""
