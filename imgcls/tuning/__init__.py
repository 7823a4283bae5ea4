"""tune.py's library: the search space, the study's database, one trial as a train.py run, the results."""
