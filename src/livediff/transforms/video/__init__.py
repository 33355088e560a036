"""The causal video pipeline's model-level core and its serving transform (issue 23).

Pieces a video ``Transform`` builds on, each in its own module, all torch code:

* :mod:`.kv_cache`: one session's rolling self-attention key/value cache (preallocated frame
  slots, sinks, eviction, re-basing).
* :mod:`.rope`: Wan's RoPE tables in fp32 on the device, and the time-axis shift of a re-base.
* :mod:`.causal`: block-causal generation on diffusers' ``WanTransformer3DModel`` weights, one
  chunk of latent frames at a time with per-session caches, and the one-pass reference under a
  block-causal mask.
* :mod:`.schedule`: the few-step flow-matching denoising of one chunk (video-to-video).
* :mod:`.vae_stream`: chunk-by-chunk encode/decode with ``AutoencoderKLWan``'s own causal cache.
* :mod:`.checkpoint`: the original Wan / Self-Forcing / StreamDiffusionV2 key names to diffusers'.

See docs/video.md. Importing this package imports no torch; its modules do.
"""
