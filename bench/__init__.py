"""Throughput and memory benchmark of the migration engines against real local servers.

``python -m bench.run`` (``make bench``) starts a source and a target server, generates a dataset, measures
the servers' raw ceilings and every engine phase against them, prints a table and writes JSON under
``bench/results/``. See ``bench/README.md``.

- ``datagen``: the deterministic dataset (sizes, document shape, seeding the source).
- ``measure``: running work in child processes and measuring time, CPU and peak RSS there.
- ``workers``: the functions those child processes run (ceilings, dump, restore, copy, validation).
- ``phases``: the phases, each turning child measurements into figures; add a phase there.
- ``report``: figures, targets, the printed table and the JSON file.
- ``run``: the command line.
"""
