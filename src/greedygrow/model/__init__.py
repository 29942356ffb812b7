"""The UViT: a transformer core on a G×G token grid inside a convolutional shell."""

from greedygrow.model.core import Conditioning, Core, CoreConfig
from greedygrow.model.layers import flop_counter
from greedygrow.model.presets import (
    CORE_PRESETS,
    SHELL_FAMILIES,
    SHELL_PRESETS,
    ShellFamily,
    core_preset,
    preset_family,
    preset_table,
    shell_preset,
)
from greedygrow.model.shell import Shell, ShellConfig
from greedygrow.model.uvit import UViT, count_flops, count_parameters
