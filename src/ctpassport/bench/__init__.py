"""``ctpassport bench``: vanilla TotalSegmentator vs ctpassport's pipelines, end to end, with agreement.

:mod:`.runner` runs the configurations (one worker process each, interleaved per case), :mod:`.metrics`
computes Dice / voxel agreement against vanilla, :mod:`.report` writes ``results.json``, ``report.md``,
``latency.png`` and ``dice.png``; :mod:`.inputs` makes the resampled input variants.
"""
