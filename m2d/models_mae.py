"""The published module path of the models (`from m2d import models_mae`): see m2d.model.vit."""
from m2d.model.vit import *  # noqa: F401,F403
