"""A user LightningModule whose first training step fails once per marker file: a transient fault."""

import os

import pytorch_lightning as pl
import torch


class FlakyNet(pl.LightningModule):
    def __init__(self, input_shape, num_classes, marker: str, kill: bool = False):
        super().__init__()
        self.marker, self.kill = marker, kill
        self.net = torch.nn.Linear(input_shape[0], num_classes)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            if self.kill:
                os._exit(1)  # the worker process dies, as on a lost node
            raise OSError("transient storage hiccup")
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
