"""imgcls: the image-classification toolkit behind the entry scripts (see docs/architecture.md).

The rule: the top level holds the entry scripts (train.py, eval.py, test.py, export.py, runs.py and
`dataset.py check`) and the card's three design modules, models.py, dataset.py and config.py. Those three
are the package's public faces: short modules that only re-export the names a user of the card needs;
the code lives here. The package never imports a top-level module; entry scripts import the package
(never each other, never the faces); faces import the package only. Inside the package, a module imports
only from its own layer or lower ones (L0 errors, cli, settings, recipes, files: no torch; L1 preprocess,
checkpoint, machine, plots, data/; L2 networks/, runfolder; L3 evaluation/; L4 training/; L5 export/ and
later serving/, cleaning/, tuning/). tests/test_layout.py keeps this rule.
"""
