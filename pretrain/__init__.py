"""The pre-training suite: everything the scripts beside this package do, one module per concern.

The scripts (train-sentencepiece.py, Utilities/tokenize-dataset.py, pre-training.py) parse their arguments, call
into these modules and exit; docs/code-layout.md lists what each module holds.
"""
