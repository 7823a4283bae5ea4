"""What a label-cleaning report folder holds (clean.py find writes it, clean.py apply reads it): names
only, no torch, so that `apply` never loads it."""

CSV, RECORD, PICTURE, PAGE = "label_issues.csv", "label_issues.json", "label_issues.png", "label_issues.html"
COLUMNS = ["path", "given", "suggested", "score", "kind", "action", "note"]
ACTIONS = ("keep", "relabel", "drop")
RECORD_VERSION = 1  # of label_issues.json: the data set as the job saw it
# cleanlab's rules for which images count as mislabelled (find_label_issues' filter_by), its default first
FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")
