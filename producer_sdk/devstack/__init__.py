"""The local development stack behind `i2v dev` and the test fixtures."""

from i2v_fleet.connection import free_port

from .process import BackgroundProcess
from .stack import DevStack, ServiceStatus, StackConfig, default_state_dir

__all__ = [
    "BackgroundProcess",
    "DevStack",
    "ServiceStatus",
    "StackConfig",
    "default_state_dir",
    "free_port",
]
