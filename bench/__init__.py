"""`make bench`: the project's stages against TRL's trainers on one fixed CPU workload.

``python -m bench --size smoke|full`` (bench/__main__.py) runs SFT, RM, DPO and step 3 for both
sides, alternating, each (stage, side, run) in its own process; quality is scored by the
framework-neutral functions of bench/workload.py. Results: <out>/bench.json and <out>/table.md.
"""
