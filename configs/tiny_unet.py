# Stage 2 of the bundled tiny model: UNet and both text encoders from scratch on captioned procedural
# portraits (prior preservation off: plain fine-tuning), starting from stage 1's export. Its
# model.safetensors is what ships as models/plainxl-tiny.safetensors.
#   python -m train.dreambooth --config configs/tiny_unet.py
config = dict(
    model="runs/tiny/vae/model.safetensors",
    instance_data_dir="runs/tiny/portraits",  # NNNNN.png + NNNNN.txt captions
    prior_loss_weight=0.0,
    train=["unet", "text_encoder_1", "text_encoder_2"],
    resolution=64,
    center_crop=True,
    random_flip=False,  # a flip would swap the eyes of heterochromia characters
    cache_latents=True,  # the VAE is frozen here: encode the 6000 portraits once
    caption_dropout_rate=0.1,  # learn the unconditional prediction that guidance needs
    caption_tag_dropout_rate=0.25,  # and partial prompts ("1girl, red eyes"), keeping "1girl"
    keep_tokens=1,
    batch_size=32,
    max_steps=2500,
    lr=1e-3,
    lr_schedule="cosine",
    warmup_steps=100,
    snr_gamma=5.0,  # Min-SNR weighting: faster convergence (Hang et al. 2023)
    weight_decay=0.0,
    checkpoint_every=250,
    export_dtype="fp16",
    output_dir="runs/tiny/unet",
)
