"""IP-Adapter params in Livepeer's StreamDiffusion shape (ai-runner's ``IPAdapterConfig``).
Torch-free: the ai-runner loader imports the params under a guard.

``ip_adapter`` steers every frame with a style image (``ip_adapter_style_image_url``): the
image's CLIP embedding becomes four extra tokens each cross-attention also attends to, scaled by
``scale`` and by a per-layer multiplier that ``weight_type`` picks (see :mod:`.ip_adapter`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: The IP-Adapter weights in h94's layout: ``models/ip-adapter_sd15.bin`` with
#: ``models/image_encoder`` (SD 1.5 family), ``sdxl_models/ip-adapter_sdxl.bin`` with
#: ``sdxl_models/image_encoder`` (SDXL).
IP_ADAPTER_REPO = "h94/IP-Adapter"
#: IP-Adapter FaceID in h94's layout: ``ip-adapter-faceid_sd15.bin`` / ``_sdxl.bin`` at the root
#: (a face embedding projected to 4 tokens; the same per-layer to_k_ip / to_v_ip).
FACEID_REPO = "h94/IP-Adapter-FaceID"
#: The face model: a hub mirror of insightface's buffalo_l pack (``models/buffalo_l/``:
#: ``det_10g.onnx`` SCRFD detection, ``w600k_r50.onnx`` ArcFace recognition).
FACE_MODEL_REPO = "public-data/insightface"

#: Livepeer's 15 weight types (ComfyUI_IPAdapter_plus's names): how the strength spreads over
#: the UNet's cross-attention layers.
WeightType = Literal[
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak output",
    "weak middle",
    "strong middle",
    "style transfer",
    "composition",
    "strong style transfer",
    "style and composition",
    "style transfer precise",
    "composition precise",
]
IPAdapterType = Literal["regular", "faceid"]
#: Largest ``scale`` (Livepeer: 0 off, 1 normal, 2 strong).
MAX_IP_SCALE = 5.0


class IPAdapterConfig(BaseModel):
    """One session's IP-Adapter: which kind, how strong, spread how over the layers."""

    model_config = ConfigDict(extra="forbid")

    type: IPAdapterType = Field(
        "regular",
        description="regular: the style image's CLIP embedding; faceid: the ArcFace embedding"
        " of the face in the style image (h94/IP-Adapter-FaceID; a picture without a face is"
        " refused with a 422).",
    )
    scale: float = Field(
        1.0,
        ge=0,
        le=MAX_IP_SCALE,
        description="Strength of the style image: 0 off, 1 normal, 2 strong.",
    )
    weight_type: WeightType = Field(
        "linear",
        description="How the strength spreads over the cross-attention layers (Livepeer's and"
        " ComfyUI_IPAdapter_plus's names, e.g. 'style transfer', 'composition').",
    )
    enabled: bool = Field(True, description="Whether the IP-Adapter acts.")
    ipadapter_model_path: str = Field(
        IP_ADAPTER_REPO,
        min_length=1,
        max_length=500,
        description="Hub id or folder in h94/IP-Adapter's layout (models/ for the SD 1.5 family,"
        " sdxl_models/ for SDXL; the model's family picks); on the model allow-list. For"
        " faceid, h94/IP-Adapter stands for h94/IP-Adapter-FaceID (its layout: the family's"
        " ip-adapter-faceid_sd15.bin / _sdxl.bin at the root).",
    )
    insightface_model_name: Literal["buffalo_l"] = Field(
        "buffalo_l",
        description="faceid's face model (insightface's pack; buffalo_l only, from the hub"
        f" mirror {FACE_MODEL_REPO}).",
    )

    @model_validator(mode="after")
    def _faceid_repo(self) -> IPAdapterConfig:
        """faceid with the plain adapter's repo means h94's FaceID repo."""
        if self.type == "faceid" and self.ipadapter_model_path == IP_ADAPTER_REPO:
            self.ipadapter_model_path = FACEID_REPO
        return self

    def active(self, image_url: str) -> bool:
        """Whether it changes the frames: enabled, scale above 0, a style image given."""
        return self.enabled and self.scale > 0 and bool(image_url)
