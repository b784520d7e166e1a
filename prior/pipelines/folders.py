"""Which pipeline a saved folder holds, and one clear error when it is not the one a caller needs.

A ``save_pretrained`` folder names its pipeline class in ``model_index.json`` (``_class_name``):
``ColaTextPipeline`` for a Cola DLM (Stage 2 exports, converted released checkpoints) and
``ARTextPipeline`` for the matched autoregressive baseline (``task: ar`` exports). Loading
dispatches on it (:func:`prior.checkpoints.released.load_pipeline`); an entry point that needs one
kind and is given the other fails with :func:`check_pipeline_class`'s one line, before any weight
is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

INDEX_FILE = "model_index.json"
KINDS = {
    "ColaTextPipeline": "a Cola DLM pipeline (ColaTextPipeline)",
    "ARTextPipeline": "an autoregressive baseline pipeline (ARTextPipeline, task: ar)",
    "MDMTextPipeline": "a masked-diffusion baseline pipeline (MDMTextPipeline, task: mdm)",
    "ColaTextToImagePipeline": "a text+image Cola pipeline (ColaTextToImagePipeline, task: multimodal)",
    "ColaImageToTextPipeline": "a text+image Cola pipeline (ColaImageToTextPipeline, task: multimodal)",
}


def pipeline_class_name(folder: str | os.PathLike) -> str | None:
    """``_class_name`` of ``folder/model_index.json``, or None when the folder has no such file."""
    path = Path(folder).expanduser() / INDEX_FILE
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg})") from e
    name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"{path} has no '_class_name' naming its pipeline class")
    return name


def check_pipeline_class(
    folder: str | os.PathLike,
    expected: str,
    purpose: str | None = None,
    shown: str | os.PathLike | None = None,
) -> None:
    """Raise one ValueError line when ``folder`` holds a pipeline other than ``expected`` (a class
    name); folders without ``model_index.json`` pass. ``purpose`` names the caller in the message
    (default ``{expected}.from_pretrained``), ``shown`` the path to print (default ``folder``)."""
    found = pipeline_class_name(folder)
    if found is None or found == expected:
        return
    what = KINDS.get(found, f"a {found} folder")
    raise ValueError(
        f"{shown or folder} holds {what}, but {purpose or expected + '.from_pretrained'} needs "
        f"{KINDS.get(expected, expected)}"
    )


__all__ = ["INDEX_FILE", "KINDS", "check_pipeline_class", "pipeline_class_name"]
