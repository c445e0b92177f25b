"""LeNet-5 on MNIST (LeCun et al. 1998, with ReLU and max pooling).

Command:   python -m jaxcnn train experiments/mnist_lenet5.py --workdir runs/mnist_lenet5
Question:  the course's first CNN on the digits it was designed for.
Runtime:   10 epochs of 60,000 images: 16 min wall (707 train images/s), measured 2026-11-26 with jax 0.10.2 on a
           2-core x86 CPU shared with other jobs (load average about 12). The same network trains at about 40,000
           images/s on an idle 2-core Intel Xeon (experiments/fashion_mnist_lenet5.py, 2026-12-02): under a minute
           there.
Expected:  99.31% test accuracy (seed 0, jax 0.10.2, 2026-11-26); LeCun et al. report 99.05% for LeNet-5.
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
