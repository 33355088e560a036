"""Where the model comes from: a local diffusers folder or a Hugging Face hub id.

``--model`` names a folder in diffusers layout (model_index.json, unet/, text_encoder/,
tokenizer/, scheduler/, vae/) or a hub id; ``--vae`` a Tiny AutoEncoder folder or hub id, or
``full`` for the model's own VAE. Hub downloads go to ``model_dir`` (LIVEDIFF_MODEL_DIR /
MODEL_DIR) or the Hugging Face cache. With ``HF_HUB_OFFLINE=1`` nothing is downloaded, and a
missing model is an error that says which command fetches it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from livediff.config import DEFAULT_SDXL_VAE, DEFAULT_VAE
from livediff.transforms.diffusion.params import FULL_VAE

#: What a model folder must hold (weights are checked per component below).
MODEL_FILES = (
    "model_index.json",
    "unet/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
WEIGHT_SUFFIXES = (".safetensors", ".bin")
HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    # the SDXL family's second text encoder (matches nothing in an SD repo)
    "tokenizer_2/*",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
]
FULL_VAE_PATTERNS = ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
TINY_VAE_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelUnavailableError(LookupError):
    """The model or VAE cannot be found (or fetched); the message says how to get it."""

    def __init__(self, message: str, role: str = "model") -> None:
        super().__init__(message)
        #: Which choice failed: "model" or "vae".
        self.role = role


class UnsupportedModelError(ModelUnavailableError):
    """The folder holds a model this transform cannot run (e.g. an SDXL UNet)."""


@dataclass(frozen=True)
class ModelChoice:
    """The model and VAE a worker runs, as the user named them."""

    model: str
    vae: str
    model_dir: str | None = None

    @property
    def full_vae(self) -> bool:
        return self.vae == FULL_VAE

    def fetch_command(self) -> str:
        command = f"livediff prepare-models --model {self.model} --vae {self.vae}"
        if self.model_dir:
            command += f" --model-dir {self.model_dir}"
        return command


@dataclass(frozen=True)
class ModelPaths:
    """Local folders of a resolved :class:`ModelChoice`."""

    model: Path
    vae: Path


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def locate(choice: ModelChoice, *, download: bool = False) -> ModelPaths:
    """Local folders for the model and its VAE, downloading hub ids when ``download`` is True.

    Without ``download`` only what is already on disk counts. Raises ModelUnavailableError with
    a message naming what is missing and the command that fetches it.
    """
    model = _locate_one(choice, choice.model, "model", HUB_PATTERNS, download)
    _check_model_folder(model, choice)
    if choice.full_vae:
        vae = model / "vae"
    else:
        tiny = family_vae(choice.vae, model)
        vae = _locate_one(choice, tiny, "vae", TINY_VAE_PATTERNS, download)
    vae_name = f"{choice.model!r} vae/" if choice.full_vae else repr(choice.vae)
    _check_weights(vae, f"VAE {vae_name}", "vae")
    return ModelPaths(model=model, vae=vae)


def is_sdxl(model: Path) -> bool:
    """Whether the model folder holds the SDXL family (its UNet's added conditioning is
    ``text_time``): read from its config, never from its name."""
    config = json.loads((model / "unet" / "config.json").read_text())
    return bool(config.get("addition_embed_type") == "text_time")


def family_vae(vae: str, model: Path) -> str:
    """The Tiny AutoEncoder to use: the default one stands for the SDXL family's
    (``madebyollin/taesdxl``) when the model is of that family; any other choice is kept."""
    return DEFAULT_SDXL_VAE if vae == DEFAULT_VAE and is_sdxl(model) else vae


def _locate_one(
    choice: ModelChoice, name: str, role: str, patterns: list[str], download: bool
) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.startswith((".", "/", "~")) or not REPO_ID.fullmatch(name):
        raise ModelUnavailableError(
            f"{role} {name!r} is neither a folder nor a hub id like 'owner/name'", role
        )
    if role == "model" and choice.full_vae:
        patterns = patterns + FULL_VAE_PATTERNS
    return _hub_folder(choice, name, role, patterns, download)


def _hub_folder(
    choice: ModelChoice, repo_id: str, role: str, patterns: list[str], download: bool
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    local_only = not download or hub_offline()
    try:
        folder = snapshot_download(
            repo_id,
            cache_dir=choice.model_dir,
            allow_patterns=patterns,
            local_files_only=local_only,
        )
    except (LocalEntryNotFoundError, FileNotFoundError) as exc:
        if local_only:
            raise ModelUnavailableError(_missing_message(choice, role, repo_id), role) from exc
        raise _download_failed(choice, role, repo_id, exc) from exc  # the hub was unreachable
    except (HfHubHTTPError, OSError) as exc:
        raise _download_failed(choice, role, repo_id, exc) from exc
    return Path(str(folder))


def _download_failed(
    choice: ModelChoice, role: str, repo_id: str, exc: Exception
) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"cannot download {role} {repo_id!r}: {exc}; check the name and the network, or"
        f" fetch it where the hub is reachable: {choice.fetch_command()}",
        role,
    )


def _missing_message(choice: ModelChoice, role: str, repo_id: str) -> str:
    where = choice.model_dir or "the Hugging Face cache"
    reason = " and HF_HUB_OFFLINE is set" if hub_offline() else ""
    return (
        f"{role} {repo_id!r} is not downloaded (looked in {where}){reason};"
        f" fetch it first with: {choice.fetch_command()}"
    )


def _check_model_folder(folder: Path, choice: ModelChoice) -> None:
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    tokenizer = folder / "tokenizer"
    if not any(all((tokenizer / f).is_file() for f in files) for files in TOKENIZER_FILES):
        missing.append("tokenizer/vocab.json + merges.txt (or tokenizer.json)")
    if missing:
        raise ModelUnavailableError(
            f"model {choice.model!r} ({folder}) is not a complete diffusers folder: missing"
            f" {', '.join(missing)}; fetch it with: {choice.fetch_command()}"
        )
    parts = ["unet", "text_encoder"]
    if is_sdxl(folder):
        parts.append("text_encoder_2")
        tokenizer_2 = folder / "tokenizer_2"
        if not any((tokenizer_2 / name).is_file() for name in ("vocab.json", "tokenizer.json")):
            raise ModelUnavailableError(
                f"model {choice.model!r} ({folder}) is of the SDXL family but has no tokenizer_2/;"
                f" fetch it with: {choice.fetch_command()}"
            )
    for part in parts:
        _check_weights(folder / part, f"model {choice.model!r} {part}/", "model")


def _check_weights(folder: Path, what: str, role: str) -> None:
    if not (folder / "config.json").is_file():
        raise ModelUnavailableError(f"{what} has no config.json in {folder}", role)
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir() if p.is_file()):
        raise ModelUnavailableError(f"{what} has no weights (*.safetensors) in {folder}", role)


def download(model: str, vae: str, model_dir: str | None = None) -> ModelPaths:
    """Fetch what ``serve`` needs (``livediff prepare-models``), with a progress bar per file.

    Local folders are only checked. Raises ModelUnavailableError when HF_HUB_OFFLINE is set
    and something is missing, or the hub cannot be reached.
    """
    choice = ModelChoice(model, vae, model_dir)
    if hub_offline():
        try:
            return locate(choice)
        except ModelUnavailableError as exc:
            name = choice.vae if exc.role == "vae" else choice.model
            raise ModelUnavailableError(
                f"{exc.role} {name!r} is missing and HF_HUB_OFFLINE is set, so nothing can be"
                " downloaded: unset HF_HUB_OFFLINE and run prepare-models again",
                exc.role,
            ) from exc
    return locate(choice, download=True)


#: What a ControlNet (or another single-model repo) folder holds.
CONTROLNET_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]


def locate_repo(
    name: str,
    role: str,
    patterns: list[str],
    model_dir: str | None,
    *,
    download: bool = False,
    fetch: str = "livediff prepare-models",
) -> Path:
    """A single-model folder (a ControlNet, the depth model): the folder itself, or a hub id
    found in ``model_dir`` (downloaded when ``download`` and the hub may be used). Raises
    ModelUnavailableError naming the command that fetches it."""
    path = Path(name).expanduser()
    if path.is_dir():
        folder = path
    elif name.startswith((".", "/", "~")) or not REPO_ID.fullmatch(name):
        raise ModelUnavailableError(f"{role} {name!r} is neither a folder nor a hub id", role)
    else:
        folder = _hub_repo(name, role, patterns, model_dir, download=download, fetch=fetch)
    _check_weights(folder, f"{role} {name!r}", role)
    return folder


def _hub_repo(
    repo_id: str,
    role: str,
    patterns: list[str],
    model_dir: str | None,
    *,
    download: bool,
    fetch: str,
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    local_only = not download or hub_offline()
    try:
        folder = snapshot_download(
            repo_id, cache_dir=model_dir, allow_patterns=patterns, local_files_only=local_only
        )
    except (LocalEntryNotFoundError, FileNotFoundError) as exc:
        reason = " and HF_HUB_OFFLINE is set" if hub_offline() else ""
        where = model_dir or "the Hugging Face cache"
        raise ModelUnavailableError(
            f"{role} {repo_id!r} is not downloaded (looked in {where}){reason};"
            f" fetch it first with: {fetch}",
            role,
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelUnavailableError(
            f"cannot download {role} {repo_id!r}: {exc}; fetch it where the hub is reachable:"
            f" {fetch}",
            role,
        ) from exc
    return Path(str(folder))


def locate_controlnet(model_id: str, model_dir: str | None, *, download: bool = False) -> Path:
    """A ControlNet's diffusers folder (config.json + weights), as :func:`locate_repo`."""
    return locate_repo(
        model_id,
        "ControlNet",
        CONTROLNET_PATTERNS,
        model_dir,
        download=download,
        fetch=f"livediff prepare-models --controlnet {model_id}",
    )


#: What the depth model's folder holds.
DEPTH_PATTERNS = ["config.json", "model.safetensors", "preprocessor_config.json"]


def locate_depth_model(name: str, model_dir: str | None, *, download: bool = False) -> Path:
    """The depth preprocessor's model folder (Depth Anything, transformers layout)."""
    return locate_repo(
        name,
        "depth model",
        DEPTH_PATTERNS,
        model_dir,
        download=download,
        fetch=f"livediff prepare-models --depth-model {name}",
    )


#: What a LoRA repo holds that livediff reads (its weights; diffusers' file name is preferred).
LORA_PATTERNS = ["*.safetensors"]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def locate_lora(lora_id: str, model_dir: str | None, *, download: bool = False) -> Path:
    """A LoRA's safetensors file: the file itself, or the one in a folder or hub repo
    (``pytorch_lora_weights.safetensors``, else the only ``*.safetensors`` at its top).
    Hub ids are found in ``model_dir`` (downloaded when ``download`` and the hub may be used).
    Raises ModelUnavailableError naming the command that fetches it."""
    path = Path(lora_id).expanduser()
    if path.is_file():
        return _lora_file_checked(path, lora_id)
    if path.is_dir():
        return _lora_file_in(path, lora_id)
    if lora_id.startswith((".", "/", "~")) or not REPO_ID.fullmatch(lora_id):
        raise ModelUnavailableError(
            f"LoRA {lora_id!r} is neither a file, a folder nor a hub id like 'owner/name'", "lora"
        )
    fetch = f"livediff prepare-models --lora {lora_id}"
    folder = _hub_repo(lora_id, "LoRA", LORA_PATTERNS, model_dir, download=download, fetch=fetch)
    return _lora_file_in(folder, lora_id)


def _lora_file_in(folder: Path, lora_id: str) -> Path:
    if (folder / LORA_WEIGHT_NAME).is_file():
        return folder / LORA_WEIGHT_NAME
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(found) == 1:
        return found[0]
    what = "no *.safetensors file" if not found else f"{len(found)} *.safetensors files"
    raise ModelUnavailableError(
        f"LoRA {lora_id!r} ({folder}) holds {what}; name the file itself (a path), or use a"
        f" folder holding {LORA_WEIGHT_NAME}",
        "lora",
    )


def _lora_file_checked(path: Path, lora_id: str) -> Path:
    if path.suffix != ".safetensors":
        raise ModelUnavailableError(f"LoRA {lora_id!r} is not a .safetensors file", "lora")
    return path


#: What the safety filter's classifier folder holds (transformers' layout; a timm model's
#: config.json carries its input size, mean and std).
SAFETY_PATTERNS = ["config.json", "model.safetensors", "preprocessor_config.json"]


def locate_safety_model(name: str, model_dir: str | None, *, download: bool = False) -> Path:
    """The safety filter's NSFW classifier folder, as :func:`locate_repo`."""
    return locate_repo(
        name,
        "safety model",
        SAFETY_PATTERNS,
        model_dir,
        download=download,
        fetch=f"livediff prepare-models --safety-model {name}",
    )


#: h94/IP-Adapter's family subfolders: (subfolder, adapter file) of the SD 1.5 family and SDXL.
IP_ADAPTER_FILES = {
    False: ("models", "ip-adapter_sd15.bin"),
    True: ("sdxl_models", "ip-adapter_sdxl.bin"),
}


def locate_ip_adapter(
    repo: str, model_dir: str | None, sdxl: bool, *, download: bool = False
) -> Path:
    """The family folder of an IP-Adapter repo in h94's layout (``models/`` with
    ``ip-adapter_sd15.bin`` and ``image_encoder/``, or ``sdxl_models/`` for SDXL): a folder,
    or a hub id found in ``model_dir`` (downloaded when ``download`` and the hub may be used)."""
    subfolder, weights = IP_ADAPTER_FILES[sdxl]
    path = Path(repo).expanduser()
    if path.is_dir():
        folder = path
    elif repo.startswith((".", "/", "~")) or not REPO_ID.fullmatch(repo):
        raise ModelUnavailableError(
            f"IP-Adapter {repo!r} is neither a folder nor a hub id", "ip_adapter"
        )
    else:
        patterns = [
            f"{subfolder}/{weights}",
            f"{subfolder}/image_encoder/config.json",
            f"{subfolder}/image_encoder/model.safetensors",
        ]
        fetch = "livediff prepare-models --ip-adapter" + (
            "" if repo == "h94/IP-Adapter" else f" {repo}"
        )
        folder = _hub_repo(repo, "IP-Adapter", patterns, model_dir, download=download, fetch=fetch)
    family = folder / subfolder
    if not (family / "image_encoder" / "config.json").is_file():
        raise ModelUnavailableError(
            f"IP-Adapter {repo!r} ({folder}) has no {subfolder}/image_encoder/config.json",
            "ip_adapter",
        )
    return family


#: IP-Adapter FaceID's adapters (h94's layout: the files at the repo's root), by "is SDXL".
FACEID_FILES = {False: "ip-adapter-faceid_sd15.bin", True: "ip-adapter-faceid_sdxl.bin"}
#: The face model (insightface's buffalo_l pack: SCRFD detection and ArcFace recognition, the
#: onnx files of its GitHub release zip), from a hub mirror that keeps the pack's layout.
FACE_MODEL_FILES = ("models/buffalo_l/det_10g.onnx", "models/buffalo_l/w600k_r50.onnx")


def locate_faceid_adapter(
    repo: str, model_dir: str | None, sdxl: bool, *, download: bool = False
) -> Path:
    """The folder of an IP-Adapter FaceID repo in h94/IP-Adapter-FaceID's layout (the family's
    ``ip-adapter-faceid_sd15.bin`` / ``_sdxl.bin`` at its root), as :func:`locate_ip_adapter`."""
    weights = FACEID_FILES[sdxl]
    path = Path(repo).expanduser()
    if path.is_dir():
        folder = path
    elif repo.startswith((".", "/", "~")) or not REPO_ID.fullmatch(repo):
        raise ModelUnavailableError(
            f"IP-Adapter FaceID {repo!r} is neither a folder nor a hub id", "ip_adapter"
        )
    else:
        fetch = f"livediff prepare-models --ip-adapter-faceid {repo}"
        folder = _hub_repo(
            repo, "IP-Adapter FaceID", [weights], model_dir, download=download, fetch=fetch
        )
    if not (folder / weights).is_file():
        raise ModelUnavailableError(
            f"IP-Adapter FaceID {repo!r} ({folder}) has no {weights}", "ip_adapter"
        )
    return folder


def locate_face_model(name: str, model_dir: str | None, *, download: bool = False) -> Path:
    """The face model's folder (``det_10g.onnx`` and ``w600k_r50.onnx``): a folder holding
    them, or a hub mirror of insightface's buffalo_l (``models/buffalo_l/``) in ``model_dir``."""
    path = Path(name).expanduser()
    if path.is_dir():
        folder = path
    elif name.startswith((".", "/", "~")) or not REPO_ID.fullmatch(name):
        raise ModelUnavailableError(
            f"face model {name!r} is neither a folder nor a hub id", "ip_adapter"
        )
    else:
        fetch = "livediff prepare-models --ip-adapter-faceid"
        root = _hub_repo(
            name, "face model", list(FACE_MODEL_FILES), model_dir, download=download, fetch=fetch
        )
        folder = root / Path(FACE_MODEL_FILES[0]).parent
    for file in FACE_MODEL_FILES:
        if not (folder / Path(file).name).is_file():
            raise ModelUnavailableError(
                f"face model {name!r} ({folder}) has no {Path(file).name}", "ip_adapter"
            )
    return folder
