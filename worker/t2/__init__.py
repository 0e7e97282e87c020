"""Quantitative T2 from multi-echo series (qDESS, multi-echo spin echo): split, parameters, models, statistics.

``echoes`` splits and loads the series, ``parameters`` reads TR/TE/flip/spoiler, ``qdess`` and ``mese`` are the
two models, ``compute`` picks one for a loaded series, ``statistics`` turns a map into measurement entries.
"""

from worker.t2.compute import T2_MODEL_VERSION, T2Map, compute_t2
from worker.t2.echoes import MultiEchoVolume, echo_groups, load_series_with_echoes
from worker.t2.parameters import ParametersMissing
from worker.t2.statistics import merge_t2, region_names, t2_statistics, tissue_names

__all__ = [
    "T2_MODEL_VERSION",
    "MultiEchoVolume",
    "ParametersMissing",
    "T2Map",
    "compute_t2",
    "echo_groups",
    "load_series_with_echoes",
    "merge_t2",
    "region_names",
    "t2_statistics",
    "tissue_names",
]
