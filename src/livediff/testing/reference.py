"""diffusers' own img2img pipeline on a loaded bundle's components.

It is the reference the stream engine is checked against (tests) and measured against
(benchmarks/diffusion_worker.py): the same UNet, VAE, text encoder and scheduler objects, driven
by ``AutoPipelineForImage2Image``.
"""

from __future__ import annotations

from typing import Any

from diffusers import AutoPipelineForImage2Image, StableDiffusionPipeline

from livediff.transforms.diffusion.bundle import ModelBundle


def diffusers_img2img(bundle: ModelBundle) -> Any:
    """An ``AutoPipelineForImage2Image`` sharing ``bundle``'s components (no copies)."""
    text2img = StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=bundle.unet,
        scheduler=bundle.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = AutoPipelineForImage2Image.from_pipe(text2img)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_sdxl_img2img(bundle: ModelBundle) -> Any:
    """diffusers' ``StableDiffusionXLImg2ImgPipeline`` sharing an SDXL ``bundle``'s components
    (no copies), with the bundle's rule for an empty negative prompt."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe: Any = StableDiffusionXLImg2ImgPipeline(  # type: ignore[no-untyped-call]
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        text_encoder_2=bundle.text_encoder_2,
        tokenizer=bundle.tokenizer,
        tokenizer_2=bundle.tokenizer_2,
        unet=bundle.uncompiled_unet,
        scheduler=bundle.scheduler,
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=bundle.zeros_for_empty_prompt,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
