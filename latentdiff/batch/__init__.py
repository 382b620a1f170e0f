"""Scripted batch inference: a prompts file in, a folder of PNGs plus a manifest out.

One code path for ``latentdiff batch`` and ``accelerate launch inference/batch.py``: ``rows.py``
reads the prompts file and gives every image its seed, ``folder.py`` keeps the output folder
(PNGs, manifest, errors, run.json; resume; runs never mixed), ``local.py`` runs it on one process
or many.
"""
