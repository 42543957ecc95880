"""A user's frozen encoder, named in a config as 'userencoder:make' (and a broken one, 'userencoder:flat')."""

import torch


def make(input_shape, width=5):
    return torch.nn.Sequential(torch.nn.Linear(input_shape[0], width), torch.nn.Tanh())


def flat():
    """Returns rows unchanged but with an extra axis: not (batch, width) features."""
    return torch.nn.Unflatten(1, (1, -1))
