"""The checkpoint format, below both training and evaluation:

- layout.py: where checkpoints lie, the manifest that makes one complete, verification;
- find.py: the newest intact checkpoint, fetched from the remote store when needed;
- upload.py: uploads in the order that keeps the remote copy consistent, and retention;
- weights.py: the weights of any strategy's checkpoint, read safely where the format allows;
- export.py: shareable exports (safetensors + JSON, a Hugging Face model repository's layout);
- load.py: one loader for all of them, and for the released weights.

Nothing here imports the trainer; training writes checkpoints through train/callbacks/checkpoint.py.
"""

from dip_scale.checkpoint.export import load_export, resolve_export, write_export
from dip_scale.checkpoint.find import (
    checkpoint_folder,
    fetch_checkpoint,
    find_resume_checkpoint,
    resolve_checkpoint,
    resume_candidates,
)
from dip_scale.checkpoint.layout import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    RECIPE,
    checkpoint_name,
    describe_files,
    load_target,
    local_checkpoints,
    newest_complete,
    read_manifest,
    step_of,
    verify_local,
    write_manifest,
)
from dip_scale.checkpoint.load import load_model
from dip_scale.checkpoint.upload import Uploader
from dip_scale.checkpoint.weights import UntrustedCheckpoint, network_weights, read_weights, safe_load

__all__ = ["CHECKPOINTS", "LATEST", "MANIFEST", "RECIPE", "UntrustedCheckpoint", "Uploader", "checkpoint_folder",
           "checkpoint_name", "describe_files", "fetch_checkpoint", "find_resume_checkpoint", "load_export",
           "load_model", "load_target", "local_checkpoints", "network_weights", "newest_complete", "read_manifest",
           "read_weights", "resolve_checkpoint", "resolve_export", "resume_candidates", "safe_load", "step_of",
           "verify_local", "write_export", "write_manifest"]
