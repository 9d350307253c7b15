"""The model of IT: backbones cut after a layer, readouts onto sites, checkpoints and fitting.

Plain torch and numpy; no I/O beyond the files a caller names.
"""

from itloop.models.backbones import (
    Backbone,
    BackboneCard,
    build_backbone,
    list_backbones,
    register_backbone,
)
from itloop.models.checkpoints import (
    ConvertedCheckpoint,
    convert_checkpoint,
    load_converted,
    read_checkpoint,
)
from itloop.models.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ModelError,
    RegistryError,
    UntrustedCheckpointError,
)
from itloop.models.fitting import EpochRecord, FitConfig, FitResult, fit
from itloop.models.it_model import ITModel, SavedModel
from itloop.models.readouts import FactorizedReadout, Readout
from itloop.models.trials import ArrayTrialDataset, NpyTrialDataset, TrialDataset, write_trials

__all__ = [
    "ArrayTrialDataset",
    "Backbone",
    "BackboneCard",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConvertedCheckpoint",
    "EpochRecord",
    "FactorizedReadout",
    "FitConfig",
    "FitResult",
    "ITModel",
    "ModelError",
    "NpyTrialDataset",
    "Readout",
    "RegistryError",
    "SavedModel",
    "TrialDataset",
    "UntrustedCheckpointError",
    "build_backbone",
    "convert_checkpoint",
    "fit",
    "list_backbones",
    "load_converted",
    "read_checkpoint",
    "register_backbone",
    "write_trials",
]
