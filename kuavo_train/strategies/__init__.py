"""Continual-learning strategies, one module each (see base.py for what a strategy is).

`get_strategy(cfg)` returns the run's strategy; `names()` lists them. The modules are
found by listing this package, so adding a strategy touches no other file.
"""

from kuavo_train.strategies.base import StagePlan, Strategy, get_strategy, names, strategy_class

__all__ = ["StagePlan", "Strategy", "get_strategy", "names", "strategy_class"]
