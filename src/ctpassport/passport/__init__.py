"""Anatomical passports: a compact, versioned JSON description of one scan's anatomy (world mm, RAS+).

* :mod:`.schema`: the pydantic schema (:class:`~.schema.Passport`, :class:`~.schema.Organ`, ...),
  ``save_passport`` / ``load_passport`` (validated; one-line errors);
* :mod:`.build`: ``build_passport`` (arrays, one pass over the volume), ``passport_from_file`` (NIfTI),
  ``passport_from_segmentation`` (inside ``ctpassport segment --passport``);
* :mod:`.show`: the pictures (PNG with matplotlib, interactive HTML with plotly);
* :mod:`.bench`: the speed benchmark (``passport_speed``); :mod:`.synthetic`: the 117-label synthetic torso.
"""
