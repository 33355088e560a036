"""Finding the model: local folders, an offline hub cache, and the errors a user sees."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from livediff.cli import main
from livediff.testing.models import ModelFolders
from livediff.transforms.diffusion.models import ModelChoice, ModelUnavailableError, locate
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.transforms.diffusion.conftest import tiny_settings

COMMIT = "0" * 40


def hub_cache(root: Path, repo_id: str, source: Path) -> None:
    """Lay ``source`` out as the Hugging Face cache holds a downloaded snapshot of repo_id."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(source, repo / "snapshots" / COMMIT)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_offline_serve_without_the_model_names_it_and_the_fetch_command(
    offline: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--pipeline", "diffusion", "--device", "cpu", "--model-dir", str(tmp_path)]
    assert main(argv) == 2
    message = capsys.readouterr().err
    assert "'stabilityai/sd-turbo' is not downloaded" in message
    assert "HF_HUB_OFFLINE" in message and "Traceback" not in message
    assert (
        "livediff prepare-models --model stabilityai/sd-turbo --vae madebyollin/taesd"
        f" --model-dir {tmp_path}"
    ) in message


def test_offline_hub_ids_resolve_from_the_model_dir_cache(
    offline: None, tiny_model: ModelFolders, tmp_path: Path
) -> None:
    hub_cache(tmp_path, "stabilityai/sd-turbo", tiny_model.model)
    hub_cache(tmp_path, "madebyollin/taesd", tiny_model.taesd)
    settings = tiny_settings(
        tiny_model, model="stabilityai/sd-turbo", vae="madebyollin/taesd", model_dir=str(tmp_path)
    )
    transform = DiffusionTransform(settings)
    transform.load()
    try:
        assert transform.loaded_params()["model"] == "stabilityai/sd-turbo"
        assert transform._unet_batch().bundle.unet is not None
    finally:
        transform.close()


def test_prepare_models_reports_where_the_model_is(
    tiny_model: ModelFolders, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["prepare-models", "--model", str(tiny_model.model), "--vae", str(tiny_model.taesd)]
    assert main(argv) == 0
    assert f"model: {tiny_model.model}" in capsys.readouterr().out


def test_prepare_models_offline_says_it_cannot_download(
    offline: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prepare-models", "--model-dir", str(tmp_path)]) == 2
    assert "unset HF_HUB_OFFLINE" in capsys.readouterr().err


def test_an_incomplete_folder_names_what_is_missing(
    tiny_model: ModelFolders, tmp_path: Path
) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_model.model, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ModelUnavailableError, match=r"missing text_encoder/config\.json"):
        locate(ModelChoice(str(broken), str(tiny_model.taesd)))


@pytest.mark.parametrize(
    ("model", "vae", "message"),
    [
        ("./no/such/folder", "full", "neither a folder nor a hub id"),
        ("not a repo id", "full", "neither a folder nor a hub id"),
    ],
)
def test_bad_names_are_refused_before_loading(model: str, vae: str, message: str) -> None:
    with pytest.raises(ModelUnavailableError, match=message):
        locate(ModelChoice(model, vae))


def test_a_vae_of_the_wrong_kind_is_refused(tiny_model: ModelFolders) -> None:
    with pytest.raises(ModelUnavailableError, match=r"has no config\.json"):
        locate(ModelChoice(str(tiny_model.model), str(tiny_model.model)))
    transform = DiffusionTransform(tiny_settings(tiny_model, vae=str(tiny_model.model / "unet")))
    with pytest.raises(ModelUnavailableError, match="a VAE must be one of AutoencoderTiny"):
        transform.load()


def test_prepare_models_with_the_hub_unreachable_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # closed
    assert main(["prepare-models", "--model-dir", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert "cannot download model 'stabilityai/sd-turbo'" in message
    assert "is not downloaded" not in message and "Traceback" not in message
