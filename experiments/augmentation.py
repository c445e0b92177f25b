"""Data augmentation on vs off: LeNet-5 on a 5,000-image slice of Fashion-MNIST.

Command:   python -m jaxcnn sweep experiments/augmentation.py --workdir runs/augmentation
Question:  how much do random crops (zero-pad 2 pixels, crop back to 28x28) and horizontal flips help when the
           training set is small and the network can overfit it? The augmentation runs inside the compiled
           train step; evaluation always sees the plain test images.
Runtime:   about 3-6 min on an idle 2-core CPU (8 runs; 346 s of CPU time measured; 16 min wall on a busy one).
Expected:  measured 2026-11-26 with jax 0.10.2 on a 2-core x86 CPU (docs/results/augmentation.md; 5,000 training
           images, 12 epochs, mean ± sample std of 2 seeds): none 85.80 ± 0.28%, flip 86.04 ± 0.35%, crop2 85.00 ±
           0.33%, crop2+flip 84.25 ± 0.19%. At this budget augmentation does not raise accuracy: it removes the
           overfitting (train loss 0.11 without, 0.35-0.38 with crops; test loss 0.46 without, 0.41-0.43 with) but
           the cropped runs are still improving at epoch 12; whether they pass the others with more epochs (--set
           train.epochs=40) was not measured.
Full size: --set data.train_limit=none --set train.epochs=30.
CIFAR-10:  add --set data.name=cifar10 (with the data in place; not measured here); for CIFAR's usual 4-pixel
           crops, change the crop variants' data.crop_padding in sweep().
"""

from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from jaxcnn.results.sweep import chain, named, product, seeds


def get_config() -> Config:
    return Config(
        model={"name": "lenet5"},
        data=DataConfig(name="fashion_mnist", batch_size=128),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=1.0),
        train=TrainConfig(epochs=20, log_every_steps=100, eval_every_epochs=5),
    )


def sweep() -> list[dict]:
    variants = chain(
        named("none", {}),
        named("crop2", {"data.crop_padding": 2}),
        named("flip", {"data.flip": "random"}),
        named("crop2+flip", {"data.crop_padding": 2, "data.flip": "random"}),
    )
    return product(variants, seeds(5))
