# The bundled tiny refiner (plainxl-tiny-refiner): the refiner layout (bigG only, an aesthetic score in
# place of the target size), its UNet trained from scratch on the same captioned portraits as
# plainxl-tiny's, on the low-noise end of the schedule only (t < 200), as SDXL's refiner was. The VAE and
# bigG are plainxl-tiny's, frozen: the refiner takes over the base's latents and reads its prompts.
# Aesthetic score: the portraits carry no quality ratings, so every captioned sample is conditioned on
# 6.0 and every caption-dropped one (the empty prompt) on 2.5, the pipeline's defaults; the score thus
# teaches nothing about quality here, and the refiner's default negative is the unconditional it learned.
#   python -m models.init tiny-refiner runs/tiny/refiner-random.safetensors --components-from plainxl-tiny
#   python -m train.dreambooth --config configs/tiny_refiner.py
config = dict(
    model="runs/tiny/refiner-random.safetensors",
    instance_data_dir="runs/tiny/portraits",  # NNNNN.png + NNNNN.txt captions
    prior_loss_weight=0.0,
    train=["unet"],
    resolution=64,
    center_crop=True,
    random_flip=False,  # a flip would swap the eyes of heterochromia characters
    cache_latents=True,
    caption_dropout_rate=0.1,
    caption_tag_dropout_rate=0.25,
    keep_tokens=1,
    max_timestep=200,
    batch_size=32,
    max_steps=2500,
    lr=1e-3,
    lr_schedule="cosine",
    warmup_steps=100,
    snr_gamma=5.0,
    weight_decay=0.0,
    checkpoint_every=250,
    export_dtype="fp16",
    output_dir="runs/tiny/refiner",
)
