"""The config presets (the repository's ``configs/``, shipped in the wheel as ``lmforge.configs``)
and how a config argument names one.

A preset is ``configs/<section>/<name>.yaml``. A config argument resolves, in this order:

1. an existing file: that file;
2. a path spelled as in the repository (``configs/model/tiny.yaml``, or any path holding
   ``configs/<section>/<name>.yaml``) that does not exist here: the packaged preset;
3. a bare name (``tiny``, ``zero3``, ``demo``): the preset of that name in the section
   (``model=tiny``, ``parallel=zero3``; a command's own config: ``lmforge pretrain demo``).

An unknown name is one line listing the presets of its section.
"""

from __future__ import annotations

import importlib.util
import os
import re

from lmforge.pretrain.core.errors import ConfigurationError

PACKAGE = "lmforge.configs"
# pretrain/config/presets.py -> the repository root
REPO_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_YAML = (".yaml", ".yml")


def presets_dir() -> str:
    """Where the presets are: the installed ``lmforge.configs`` package, else (running from a
    source tree that is not installed) the repository's ``configs/``."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isdir(location):
            return location
    return REPO_CONFIGS


def sections() -> list[str]:
    root = presets_dir()
    if not os.path.isdir(root):  # an installation without its presets
        return []
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def names(section: str) -> list[str]:
    """The preset names of ``section`` (``model``: tiny, small, ...), sorted."""
    folder = os.path.join(presets_dir(), section)
    if not os.path.isdir(folder):
        return []
    return sorted(f.rsplit(".", 1)[0] for f in os.listdir(folder) if f.endswith(_YAML))


def preset_path(section: str, name: str) -> str | None:
    for ext in _YAML:
        path = os.path.join(presets_dir(), section, name + ext)
        if os.path.isfile(path):
            return path
    return None


def description(path: str) -> str:
    """A preset's one-line description: the first sentence of its leading comment (cut to one
    line), without a leading ``name:``."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if not text.startswith("#"):
                break
            body = text.lstrip("#").strip()
            if not body or line.lstrip().startswith("#  ") and lines:  # blank, or an example
                break
            lines.append(body)
    text = " ".join(lines)
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    stem = os.path.basename(path).rsplit(".", 1)[0]
    sentence = sentence.removeprefix(f"{stem}: ")
    if len(sentence) <= 90:
        return sentence
    return sentence[:90].rsplit(" ", 1)[0].rstrip(",;:(") + " …"


def listing() -> str:
    """Every preset by section with its description (``lmforge print-config --presets``)."""
    out = [
        f"# presets in {presets_dir()}",
        "# use as section=NAME (model=tiny), or a command's config by name (lmforge pretrain demo)",
    ]
    for section in sections():
        out.append(f"{section}:")
        for name in names(section):
            desc = description(preset_path(section, name) or "")
            out.append(f"  {name:<14} {desc}")
    return "\n".join(out)


# The preset section of each command's whole config (`lmforge pretrain demo`).
COMMAND_SECTIONS = {
    "PrepareConfig": "prepare",
    "PretrainConfig": "pretrain",
    "FinetuneConfig": "finetune",
    "ScalingConfig": "scaling",
    "SlurmProfile": "slurm",
    "ModelConfig": "model",
    "ParallelConfig": "parallel",
}


def _unknown(section: str, value: str, key: str | None) -> ConfigurationError:
    if value.endswith(_YAML):
        what = f"config file not found: {value}"
    else:
        given = f"`{key}`={value!r}" if key else repr(value)
        what = f"{given} is neither a file nor a {section} preset"
    return ConfigurationError(
        f"{what}; give a YAML file or one of the {section} presets: {', '.join(names(section))} "
        "(lmforge print-config --presets)"
    )


def _packaged(path: str) -> str | None:
    """The packaged file that a repository spelling (``.../configs/<section>/<name>.yaml``)
    names, if any."""
    parts = os.path.normpath(path).split(os.sep)
    if "configs" not in parts:
        return None
    i = len(parts) - 1 - parts[::-1].index("configs")
    rel = parts[i + 1 :]
    if len(rel) != 2:
        return None
    packaged = os.path.join(presets_dir(), *rel)
    return packaged if os.path.isfile(packaged) else None


def resolve(value: str, section: str | None, key: str | None = None) -> str | None:
    """The file that config argument ``value`` names (see the module doc), or None when it is
    neither a file nor a YAML path nor a preset name (the caller treats it as a value).
    ``section``: where a bare name is looked up (None: names are not presets here); ``key``:
    the config key given ``value`` (for the error), None for a whole config."""
    if os.path.isfile(value):
        return value
    if value.endswith(_YAML):
        found = _packaged(value)
        if found:
            return found
        parts = os.path.normpath(value).split(os.sep)
        if len(parts) >= 3 and parts[-3] == "configs" and names(parts[-2]):
            raise _unknown(parts[-2], value, key)  # configs/model/tinny.yaml
        return value  # (a missing file: the loader's one line)
    if section is None or not names(section) or not _NAME.match(value):
        return None
    path = preset_path(section, value)
    if path is None:
        raise _unknown(section, value, key)
    return path
