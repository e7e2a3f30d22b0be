"""STAR (Thomas et al., arXiv 2411.17800): architecture genomes and their evolution.

genome.py  the genome (backbone + operator levels over the zoo's LIV classes), decoding to a
           `HybridConfig` and back, validation, mutation and crossover
search.py  the search file, NSGA-II (pymoo) with training-run evaluations in worker processes,
           cached by architecture hash, resumable after a kill
report.py  Pareto fronts against hand-made baselines, the best genomes as configs, exports
"""

from zoo.star.genome import Backbone, Genome, GenomeError, decode, encode
from zoo.star.search import SearchConfig, load_search, search

__all__ = [
    "Backbone",
    "Genome",
    "GenomeError",
    "SearchConfig",
    "decode",
    "encode",
    "load_search",
    "search",
]
