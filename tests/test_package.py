"""The top-level names of `jaxcnn` mean one thing whatever was imported before."""

import subprocess
import sys


def test_train_is_the_subpackage_and_run_experiment_the_function() -> None:
    code = (
        "import types, jaxcnn\n"
        "assert isinstance(jaxcnn.train, types.ModuleType), jaxcnn.train\n"
        "import jaxcnn.train.step\n"
        "assert isinstance(jaxcnn.train, types.ModuleType)\n"
        "from jaxcnn.train.loop import train\n"
        "assert jaxcnn.run_experiment is train\n"
        "assert callable(jaxcnn.create_model) and callable(jaxcnn.load_experiment)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
