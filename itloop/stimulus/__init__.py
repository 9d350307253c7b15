"""Stimuli: the per-site attack engine, controls, the 8-bit grid and image I/O."""

from itloop.stimulus.attacks import (
    AttackConfig,
    AttackEngine,
    AttackResult,
    AttackRows,
    select_largest_change,
)
from itloop.stimulus.constraints import Constraint, L2Ball, project_l2_box, random_start_l2_box
from itloop.stimulus.controls import ControlResult, gaussian_noise_control, interpolation_control
from itloop.stimulus.errors import AttackError, StimulusError
from itloop.stimulus.folding import fold_batchnorm
from itloop.stimulus.images import (
    decode_png,
    encode_png,
    load_image,
    read_png,
    sha256_hex,
    write_png,
)
from itloop.stimulus.precision import (
    Fp32Input,
    SplitStem,
    exact_fp32,
    keep_first_conv_fp32,
    split_first_conv,
)
from itloop.stimulus.quantisation import (
    from_levels,
    max_sum_sq_levels,
    quantise,
    quantise_perturbation,
    realised_eps_l2,
    to_levels,
)

__all__ = [
    "AttackConfig",
    "AttackEngine",
    "AttackError",
    "AttackResult",
    "AttackRows",
    "Constraint",
    "ControlResult",
    "Fp32Input",
    "L2Ball",
    "SplitStem",
    "StimulusError",
    "decode_png",
    "encode_png",
    "exact_fp32",
    "fold_batchnorm",
    "from_levels",
    "gaussian_noise_control",
    "interpolation_control",
    "keep_first_conv_fp32",
    "load_image",
    "max_sum_sq_levels",
    "project_l2_box",
    "quantise",
    "quantise_perturbation",
    "random_start_l2_box",
    "read_png",
    "realised_eps_l2",
    "select_largest_change",
    "sha256_hex",
    "split_first_conv",
    "to_levels",
    "write_png",
]
