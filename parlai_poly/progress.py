"""Readable runs: ParlAI's logs to a file, a progress bar for training on the console.

ParlAI logs every option of every agent and world it builds (hundreds of ``key: value``
lines per model) and a metrics report every few seconds. Our commands that run ParlAI's
loops for a person (``make demo``) send all of that to a log file, keep only errors on the
console, and show a progress bar with the time left instead; ``verbose`` restores ParlAI's
console output.
"""
import contextlib
import logging
import math
from typing import Iterator

from tqdm import tqdm


@contextlib.contextmanager
def parlai_log_file(path: str, verbose: bool = False) -> Iterator[None]:
    """Everything ParlAI logs goes to ``path`` (appended); its console shows only errors
    unless ``verbose``."""
    from parlai.utils import logging as parlai_logging
    from transformers.utils import logging as hf_logging

    logger = parlai_logging.logger
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s | %(message)s"))
    to_file.setLevel(logging.INFO)
    logger.addHandler(to_file)
    console_level = logger.streamHandler.level
    if not verbose:
        logger.streamHandler.setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()  # a bar per backbone load, over in a blink
    try:
        yield
    finally:
        logger.streamHandler.setLevel(console_level)
        hf_logging.enable_progress_bar()
        logger.removeHandler(to_file)
        to_file.close()


def train_with_progress(keep_last: bool = False, **options) -> dict:
    """``TrainModel.main(**options)`` with a progress bar: ParlAI's train loop, whose every
    log (each --log-every-n-secs) also moves the bar and shows the loss.

    ``keep_last``: the model file ends as the last update's weights, as sentence-transformers
    keeps them, instead of ParlAI's best validation; the validations still run (the curve)."""
    from parlai.scripts.train_model import TrainLoop, TrainModel

    class ProgressTrainLoop(TrainLoop):
        def validate(self):
            stop = super().validate()
            if keep_last:
                # ParlAI saves the weights it holds when its loop ends unless a validation
                # saved a best model: so it saves the last update's, which its final reports read
                self.saved = False
            return stop

        def train_steps(self):  # the updates; ParlAI's final valid and test runs come after
            with tqdm(total=100, desc="Training", unit="%", bar_format=BAR) as self.bar:
                yield from super().train_steps()
                self.bar.n = 100  # a limit was reached (or the data ran out)
                self.bar.set_postfix_str(f"{self._train_steps} updates, saved")

        def log(self):
            super().log()
            report = self.train_reports[-1] if self.train_reports else {}
            self.bar.n = min(100, math.floor(100 * self.done_fraction()))
            loss = report.get("mean_loss", report.get("loss"))
            self.bar.set_postfix_str(f"{self._train_steps} updates" + (f", loss {loss:.3f}" if loss is not None else ""))

        def done_fraction(self) -> float:
            """How far the nearest of ParlAI's stopping rules is (time, updates, epochs)."""
            # an unset rule is infinite in ParlAI's loop: 0 done
            limits = ((self.train_time.time(), self.max_train_time), (self._train_steps, self.max_train_steps),
                      (self._total_epochs, self.max_num_epochs))
            return max(done / limit for done, limit in limits)

    class ProgressTrainModel(TrainModel):
        def run(self):
            self.train_loop = ProgressTrainLoop(self.opt)
            return self.train_loop.train()

    return ProgressTrainModel.main(**options)


# the bar ends with its time left: that is what a person waiting wants to read
BAR = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}"
