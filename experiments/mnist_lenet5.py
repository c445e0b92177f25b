"""LeNet-5 on MNIST (LeCun et al. 1998, with ReLU and max pooling).

Command:   python -m jaxcnn train experiments/mnist_lenet5.py --workdir runs/mnist_lenet5
Question:  the course's first CNN on the digits it was designed for.
Runtime:   about 2 minutes on a 2-core CPU (10 epochs of 60,000 images).
Expected:  about 99.1% test accuracy (LeCun et al. report 99.05% for LeNet-5; measured, see README).
Data:      ../shared/data/mnist (official files), or --set data.data_dir=FOLDER.
"""

from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model={"name": "lenet5", "act": "relu", "pool": "max"},
        data=DataConfig(name="mnist", batch_size=128, eval_batch_size=1000),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=1.0),
        train=TrainConfig(epochs=10, log_every_steps=100),
        seed=0,
    )
