"""Building blocks of the synthesis and curation recipes (recipes/synth.py, recipes/curate.py)."""
