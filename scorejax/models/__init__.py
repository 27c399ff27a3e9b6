"""Score networks (Flax Linen, NHWC) and the network-output -> score conversion.

`make_model(config)` is the one place a config is read: it takes a score_sde-style
config (ConfigDict, or a plain dict such as its JSON dump) whose `model` / `data`
sections use the reference's key names and returns a Linen module called as
`model.apply(variables, x, labels, train=False)` (dropout through
`rngs={'dropout': key}` when `train=True`). `make_score_fn(model_fn, sde,
continuous)` turns `model_fn(x, labels)` into `score_fn(x, t)`.
"""

from scorejax.models.factory import MODELS, make_model
from scorejax.models.score import (
    PRECONDITIONINGS,
    EDMPreconditioning,
    make_preconditioning,
    make_score_fn,
)

__all__ = ['MODELS', 'PRECONDITIONINGS', 'EDMPreconditioning', 'make_model',
           'make_preconditioning', 'make_score_fn']
