"""A fast CIFAR-10 recipe in the spirit of airbench (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU").

Command:   python -m jaxcnn sweep experiments/cifar10_airbench.py --workdir runs/cifar10_airbench
           (needs CIFAR-10, see experiments/cifar10_resnet_he.py; use a GPU)
Question:  how far do airbench's training-side ideas go with this codebase's parts? A shallow, wide net (3x3 stem
           of 24 channels, then three stages of one two-conv block at 64/256/256 channels, each later stage
           after a 2x2 max pool, GELU, BatchNorm, global average pooling), batch 1024, Nesterov SGD, label
           smoothing 0.2, a triangular learning-rate schedule (0.2 -> 1 -> 0.07 of the peak, peak at 23%),
           random 2-pixel translations and *alternating* flips (airbench's derandomised flipping), ten epochs,
           and flip + translate test-time augmentation; mean over 5 seeds, as airbench reports.
           What this is not: airbench94 itself, whose patch-whitening first layer, identity initialisation,
           Lookahead and scaled BatchNorm biases are not reproduced here.
Runtime:   not measured: no CIFAR-10 copy and no accelerator on the 2-core machine this suite is measured on. On a
           2-core CPU, expect hours (about 0.63 GFLOPs per image forward, three times that to train: 1.97M
           parameters): use a GPU.
Expected:  NOT measured here. For reference, from the literature: airbench94 reaches a mean of 94.01% test
           accuracy in 3.83 s on one NVIDIA A100 (3.29 s with torch.compile) — Jordan 2024, Table 1. This recipe
           lacks several of its parts, so expect it to land below that.
"""

from jaxcnn.config import CheckpointConfig, Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from jaxcnn.results.sweep import seeds


def get_config() -> Config:
    return Config(
        model={
            "name": "plain20", "stage_sizes": (1, 1, 1), "stage_widths": (64, 256, 256), "stem_width": 24,
            "downsample": "pool", "pool": "max", "act": "gelu", "head": "gap",
        },
        data=DataConfig(name="cifar10", batch_size=1024, eval_batch_size=2000, crop_padding=2, flip="alternating",
                        tta="flip_translate"),
        optim=OptimConfig(name="sgd", lr=0.4, momentum=0.85, nesterov=True, weight_decay=5e-4,
                          label_smoothing=0.2),
        schedule=ScheduleConfig(name="triangular", initial_lr_fraction=0.2, peak_fraction=0.23,
                                final_lr_fraction=0.07),
        train=TrainConfig(epochs=10, log_every_steps=10, eval_every_epochs=0),
        checkpoint=CheckpointConfig(every_epoch=False),
    )


def sweep() -> list[dict]:
    return seeds(5)
