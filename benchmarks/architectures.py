"""The SDXL base 1.0 architecture, written out so benchmarks build it without downloading anything.

Timing and memory do not depend on the weights, so the benchmarks build these shapes with random
weights (``UNet2DConditionModel(**SDXL_UNET_CONFIG)``).
"""

#: ``unet/config.json`` of stabilityai/stable-diffusion-xl-base-1.0.
SDXL_UNET_CONFIG: dict = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    dual_cross_attention=False,
    use_linear_projection=True,
    upcast_attention=False,
    resnet_time_scale_shift="default",
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    time_embedding_type="positional",
    conv_in_kernel=3,
    conv_out_kernel=3,
)
#: SDXL's pooled text embedding width (text_encoder_2 projection) and sequence length.
SDXL_POOLED_DIM = 1280
SDXL_TOKENS = 77

#: ``scheduler/scheduler_config.json`` (Euler, epsilon prediction), the settings that shape the steps.
SDXL_SCHEDULER_CONFIG: dict = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
    timestep_spacing="leading", prediction_type="epsilon",
)

#: ``vae/config.json``.
SDXL_VAE_CONFIG: dict = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True,
)
#: text_encoder (CLIP ViT-L/14 text) and text_encoder_2 (OpenCLIP bigG text) shapes.
SDXL_TEXT_ENCODER_CONFIGS: tuple[dict, dict] = (
    dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
         projection_dim=768, hidden_act="quick_gelu"),
    dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
         projection_dim=1280, hidden_act="gelu"),
)
