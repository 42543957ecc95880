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


class LoggingNet(TinyNet):
    """Logs in the Lightning docs style: per step and, reduced, per epoch."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("rows_seen", float(len(y)), on_step=False, on_epoch=True, reduce_fx="sum")
        return loss


class OneCycleNet(TinyNet):
    """OneCycleLR over the whole run: stepped per epoch, its horizon is every stage's epochs together."""

    def configure_optimizers(self):
        ctx = self.sisa_context
        opt = torch.optim.SGD(self.parameters(), lr=ctx.optim["lr"], momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=ctx.optim["lr"], total_steps=ctx.total_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class PerStageOneCycleNet(TinyNet):
    """The Lightning docs' OneCycleLR(total_steps=trainer.estimated_stepping_batches): one stage's horizon."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.05, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class WrongOutputNet(TinyNet):
    """Drops a column: its logits do not cover every class."""

    def forward(self, x):
        return self.net(x)[:, :-1]


class NoOptimizerNet(TinyNet):
    configure_optimizers = pl.LightningModule.configure_optimizers


class NotAModule(torch.nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
