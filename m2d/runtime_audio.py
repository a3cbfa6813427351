"""The published module path of RuntimeM2D (`from m2d.runtime_audio import RuntimeM2D`): see m2d.runtime."""
from m2d.runtime.runtime import Config, RuntimeM2D  # noqa: F401
