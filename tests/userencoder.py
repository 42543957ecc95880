"""A user's frozen encoder, named in a config as 'userencoder:make' (and broken ones: 'userencoder:flat',
'userencoder:SqrtShift' on rows below -10, and 'userencoder:RandProj' once a test swaps ``ACT``)."""

import torch

ACT = torch.tanh  # RandProj's activation, looked up per call: a test swaps it to stand for edited code


def make(input_shape, width=5):
    return torch.nn.Sequential(torch.nn.Linear(input_shape[0], width), torch.nn.Tanh())


def flat():
    """Returns rows unchanged but with an extra axis: not (batch, width) features."""
    return torch.nn.Unflatten(1, (1, -1))


class SqrtShift(torch.nn.Module):
    """sqrt(x + 10): finite features for rows above -10, NaN below."""

    def forward(self, x):
        return torch.sqrt(x + 10.0)


class RandProj(torch.nn.Module):
    """A random projection drawn at construction (a non-persistent buffer: not in the state dict, so only the
    seed it is built under makes it the same everywhere), then ``ACT``."""

    def __init__(self, input_shape):
        super().__init__()
        self.register_buffer("P", torch.randn(input_shape[0], 4), persistent=False)

    def forward(self, x):
        return ACT(x @ self.P)
