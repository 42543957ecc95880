"""A user's own LightningModule, named in a config as 'usermodel:TinyNet'."""

import pytorch_lightning as pl
import torch


class TinyNet(pl.LightningModule):
    def __init__(self, input_shape, num_classes, width=8):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(input_shape[0], width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, num_classes),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)
