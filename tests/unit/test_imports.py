"""Importing the package, or any module of it, builds nothing: no settings read, no Faust
fixed, no app, no backend, no broker contacted."""

from __future__ import annotations

import os
import subprocess
import sys

BROKEN = {
    "MARVIN_BROKER": "not-a-url",
    "MARVIN_N_CTX": "lots",
    "MARVIN_PARTITIONER": "fnv1a",
    "MARVIN_DISABLED_FAUST_FIXES": "99",
}

IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
import faust.transport.consumer as faust_consumer
import faust.transport.drivers.aiokafka as faust_aiokafka
import faust.tables.manager as faust_manager
import faust.tables.recovery as faust_recovery
fixed_classes = [
    faust_aiokafka.Consumer,
    faust_aiokafka.AIOKafkaConsumerThread,
    faust_consumer.Consumer,
    faust_consumer.TransactionManager,
    faust_manager.TableManager,
    faust_recovery.Recovery,
]
stock = [dict(vars(cls)) for cls in fixed_classes]
import marvin_faust
names = [m.name for m in pkgutil.walk_packages(marvin_faust.__path__, "marvin_faust.")]
for name in names:
    importlib.import_module(name)
changed = [
    f"{cls.__name__}.{name}"
    for cls, before in zip(fixed_classes, stock)
    for name, value in vars(cls).items()
    if before.get(name) is not value
]
assert not changed, f"Faust changed process-wide: {changed}"
assert marvin_faust.app.__class__.__name__ == "module", "the app was built"  # the submodule
assert "llama_cpp" not in sys.modules, "the model backend was loaded"
print(len(names))
"""


def test_every_module_imports_with_a_broken_environment_and_no_broker():
    env = {**os.environ, **BROKEN}
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERYTHING],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 20  # every module was imported
