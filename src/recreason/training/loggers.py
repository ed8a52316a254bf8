"""Where training scalars go: TensorBoard by default, Weights & Biases when asked for (``train.report_to``)."""

from __future__ import annotations

from pathlib import Path

from recreason.errors import ConfigError


class NullWriter:
    """Stands in for the log file and TensorBoard writer on non-main processes."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _Writers:
    """Sends every scalar to each logger in ``report_to``."""

    def __init__(self, writers):
        self.writers = writers

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for w in self.writers:
            w.add_scalar(tag, value, step)

    def close(self) -> None:
        for w in self.writers:
            w.close()


class _WandbWriter:
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(dir=str(run_dir), name=run_dir.name, config=config)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_writer(report_to, tensorboard_dir: Path, run_dir: Path, config: dict) -> _Writers:
    """TensorBoard (into ``tensorboard_dir``) by default; Weights & Biases (beside the run in ``run_dir``) when
    installed and asked for (``train.report_to``)."""
    writers = []
    for name in report_to or []:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writers.append(SummaryWriter(str(tensorboard_dir)))
        elif name == "wandb":
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("train.report_to asks for wandb, which is not installed: pip install wandb")
            writers.append(_WandbWriter(run_dir, config))
        else:
            raise ConfigError(f"train.report_to: unknown logger {name!r}; use tensorboard and/or wandb")
    return _Writers(writers)
