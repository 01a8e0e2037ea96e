"""What `train` takes: `TrainConfig`, every default chosen in one place and validated before a run
starts (`TrainConfig.resolved`). The train stage and the sweep's search space both read it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fer_mlflow.errors import ConfigError, check_convs
from fer_mlflow.learning import models
from fer_mlflow.learning.inputs import Augmentation

# What a plain `-P model=<name>` trains for when `epochs` is left at "auto".
DEFAULT_EPOCHS = {"cnn": 26, "cnn_shallow": 30, "cnn_deep": 30,
                  "resnet50": 15, "resnet101": 15, "resnet152": 15}
# ...and with a `time_budget`: the time ends training, this only bounds it.
MAX_EPOCHS = 1000
# The optimizer `optimizer=auto` means, and the peak learning rate and weight decay each one gets by
# default. For the cnn on FER2013, SGD scored 0.6-1.5 points above AdamW on validation data in a
# 55-minute budget (BENCHMARKS.md, runs K and M); the other models keep AdamW, untried with SGD.
DEFAULT_OPTIMIZER = {"cnn": "sgd", "cnn_shallow": "adamw", "cnn_deep": "adamw",
                     "resnet50": "adamw", "resnet101": "adamw", "resnet152": "adamw"}
DEFAULT_LEARNING_RATE = {"adamw": 1e-3, "sgd": 0.05}
DEFAULT_WEIGHT_DECAY = {"adamw": 1e-4, "sgd": 5e-3}


@dataclass(frozen=True)
class TrainConfig:
    """Everything `train` takes; logged whole, with the resolved values, as run params."""

    model: str = "cnn"
    data: str = "demo"
    epochs: int | None = None  # None: DEFAULT_EPOCHS[model]
    batch_size: int = 64
    optimizer: str | None = None  # adamw | sgd (Nesterov momentum 0.9); None: DEFAULT_OPTIMIZER[model]
    learning_rate: float | None = None  # peak, after a 1-epoch warm-up; None: DEFAULT_LEARNING_RATE[optimizer]
    weight_decay: float | None = None  # None: DEFAULT_WEIGHT_DECAY[optimizer]
    label_smoothing: float = 0.1  # FER2013's labels are noisy; soft targets generalise better
    schedule: str = "cosine"  # cosine | constant
    time_budget: float = 0.0  # minutes of training (phase 1), 0: none; epochs then default to MAX_EPOCHS
    patience: int = 15  # early stopping on val_accuracy, best weights restored
    class_weight: str = "none"  # none | balanced (disgust is ~1.5% of FER2013)
    image_size: int | None = None  # None: the model's default
    weights: str = "auto"  # ResNets: auto | imagenet | none | path to a weights file
    fine_tune_epochs: int = 5  # ResNets with pretrained weights: phase 2 epochs (0 skips it)
    fine_tune_layers: int = 30  # ...how many top backbone layers phase 2 unfreezes
    fine_tune_learning_rate: float = 1e-5
    widths: tuple[int, ...] = models.CNN_WIDTHS  # cnn only: channels of each block (models.build_cnn)
    convs: tuple[int, ...] = (2,)  # cnn only: convolutions in each block, one count for all or one per block
    dropout: float | None = None  # None: models.DEFAULT_DROPOUT[model]
    shift: float = 0.1
    flip: bool = True
    rotation: float = 10.0
    zoom: float = 0.1
    erase: float = 0.0
    mixup: float = 0.0  # MixUp's alpha (e.g. 0.2); 0: off
    cutmix: float = 0.0  # CutMix's factor, 0..1 (e.g. 1.0); 0: off
    val_fraction: float = 0.1  # raw sources without a validation split
    seed: int = 0
    strategy: str = "default"  # default | mirrored | multi_worker (TF_CONFIG: `learning.distribution`)
    checkpoint_minutes: float = 5.0  # log the training state at most this often (0: every epoch)
    resume: str = ""  # a stopped training run's id: go on from its last checkpoint, in that run
    init: str = ""  # a logged model of the same network whose weights training starts from (fine-tuning)
    teacher: str = ""  # a logged model (or ensemble) whose served probabilities are soft targets
    distill_alpha: float = 0.5  # the teacher's share of each target, the labels' the rest
    distill_temperature: float = 2.0  # the teacher's probabilities softened by this (`calibration.tempered`)
    ema: float = 0.0  # momentum of an exponential moving average of the weights (e.g. 0.999), validated and kept; 0: off

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(self.shift, self.flip, self.rotation, self.zoom, self.erase, self.mixup, self.cutmix)

    def resolved(self) -> TrainConfig:
        """The config with its 'auto' values (None) filled in, validated."""
        if self.model not in models.MODEL_NAMES:
            raise ConfigError(f"unknown model {self.model!r}; expected one of {', '.join(models.MODEL_NAMES)}")
        optimizer = self.optimizer or DEFAULT_OPTIMIZER[self.model]
        for name, value, allowed in (("optimizer", optimizer, ("adamw", "sgd")),
                                     ("schedule", self.schedule, ("cosine", "constant")),
                                     ("class_weight", self.class_weight, ("none", "balanced")),
                                     ("strategy", self.strategy, ("default", "mirrored", "multi_worker"))):
            if value not in allowed:
                raise ConfigError(f"{name}={value} is not one of {', '.join(allowed)}")
        if not 0 <= self.distill_alpha <= 1 or self.distill_temperature <= 0:
            raise ConfigError(f"distill_alpha={self.distill_alpha} must lie in 0..1 and distill_temperature="
                              f"{self.distill_temperature} be above 0")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema={self.ema} must lie in 0..1 (1 excluded): the moving average's momentum per "
                              "step, e.g. 0.999, or 0 for none")
        if self.mixup < 0 or not 0 <= self.cutmix <= 1:
            raise ConfigError(f"mixup={self.mixup} must be 0 or above (MixUp's alpha, e.g. 0.2) and cutmix="
                              f"{self.cutmix} lie in 0..1 (CutMix's factor, e.g. 1.0); 0 turns either off")
        if self.model == "cnn":
            check_convs(self.convs, self.widths)  # kept as given (2: every block), so a resumed run's match
        if self.time_budget < 0:
            raise ConfigError(f"time_budget={self.time_budget} is negative; give minutes of training, or 0 for none")
        if self.strategy == "multi_worker" and self.teacher:
            raise ConfigError("strategy=multi_worker does not take a teacher (its followers cannot reach the "
                              "chief's store); distil with strategy=default or mirrored")
        if self.strategy == "multi_worker" and (self.time_budget or self.resume):
            # Each worker would stop on its own clock, and the others then wait for it forever.
            raise ConfigError("strategy=multi_worker trains for a number of epochs on every worker alike: "
                              "pass -P epochs=N instead of time_budget, and start again rather than resume")
        return replace(
            self,
            optimizer=optimizer,
            learning_rate=DEFAULT_LEARNING_RATE[optimizer] if self.learning_rate is None else self.learning_rate,
            weight_decay=DEFAULT_WEIGHT_DECAY[optimizer] if self.weight_decay is None else self.weight_decay,
            epochs=self.epochs if self.epochs is not None
            else MAX_EPOCHS if self.time_budget else DEFAULT_EPOCHS[self.model],
            image_size=models.DEFAULT_IMAGE_SIZE[self.model] if self.image_size is None else self.image_size,
            dropout=models.DEFAULT_DROPOUT[self.model] if self.dropout is None else self.dropout,
        )
