"""LeNet-5 on Fashion-MNIST: the main job.

Command:   python -m jaxcnn train experiments/fashion_mnist_lenet5.py --workdir runs/fashion_mnist_lenet5
Question:  how far does the classic LeNet-5 (61,706 parameters; ReLU and max pooling) get on Fashion-MNIST?
Runtime:   15 epochs of 60,000 images: 31 s wall (38,516 train images/s), measured 2026-12-06 on a 2-core Intel
           Xeon VM (AVX-512, AMX), jax 0.10.2.
Expected:  91.78% test accuracy on all 10,000 test images (seed 0, jax 0.10.2, 2026-12-06; the last digits move
           with the order of floating-point sums, which depends on the machine and the kernels: 91.4-91.8%);
           >= 89.5% required.
Data:      Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), or --set data.data_dir=FOLDER.
"""

from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model={"name": "lenet5", "act": "relu", "pool": "max"},
        data=DataConfig(name="fashion_mnist", batch_size=128, eval_batch_size=1000, flip="random"),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=1.0),
        train=TrainConfig(epochs=15, log_every_steps=100),
        seed=0,
    )
